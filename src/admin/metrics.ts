// Prometheus metrics (prom-client): latency histograms fed on the hot path through a LUN's stats layer,
// everything else read from the site's status snapshot at scrape time (one source of truth).
//
// Series budget (test/admin/metrics.test.ts counts a 64-LUN site): per LUN the latency histogram
// has only read and write, with 7 buckets; every command's latency, with finer buckets, is in a
// site-wide histogram; the state gauge lists only the states of the LUN's role.
import fs from 'node:fs';
import client from 'prom-client';
import type { LatencyHook } from '../lun/stats-layer.js';
import { CMD } from '../nbd/constants.js';
import { logLinesLost } from '../log.js';
import { catchup } from '../mirror/primary/protection.js';

const OPS: Record<number, string> = {
  [CMD.READ]: 'read', [CMD.WRITE]: 'write', [CMD.FLUSH]: 'flush', [CMD.TRIM]: 'trim',
  [CMD.CACHE]: 'cache', [CMD.WRITE_ZEROES]: 'write_zeroes', [CMD.BLOCK_STATUS]: 'block_status',
};
/** Commands with a per-LUN latency histogram. */
const LUN_OPS = new Set(['read', 'write']);
export const LUN_LATENCY_BUCKETS = [0.0001, 0.0005, 0.002, 0.01, 0.05, 0.25, 1];
export const SITE_LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5];
export const LINK_HEALTH_STATES = ['connecting', 'up', 'down', 'probation', 'ready'] as const;

/** This package's version (package.json next to src/ or dist/). */
export const VERSION: string = (() => {
  try {
    return (JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
})();
export const LUN_STATES = [
  'standalone', 'connecting', 'uptodate', 'journaling', 'probation', 'replaying', 'syncing', 'resyncing', 'unpaired', 'split-brain',
  'secondary-uptodate', 'secondary-waiting', 'secondary-syncing', 'secondary-inconsistent',
] as const;
export const PRIMARY_STATES = LUN_STATES.filter((s) => !s.startsWith('secondary-'));
/** A secondary's states; split brain is recorded on both sites. */
export const SECONDARY_STATES = LUN_STATES.filter((s) => s.startsWith('secondary-') || s === 'split-brain');

/** The slice of the status snapshot (admin/status.ts SiteStatus) the metrics read; SiteStatus is one, unconverted. */
export interface MetricsSnapshot {
  luns: Array<{
    name: string; state: string; role: string; mode?: string; size?: number; hosts?: number;
    protection?: string | null;
    counters: { readOps: number; readBytes: number; writeOps: number; writeBytes: number; errors: number };
    inflight?: number; lagBytes?: number; dirtyRegions?: number;
    mirrored?: { ops: number; bytes: number; failures: number; resyncedBytes?: number };
    journal?: { records: number; bytes: number; oldestAgeMs: number | null };
    progress?: { replayTotal: number; replayDone: number; resyncTotal: number; resyncDone: number; syncTotal?: number; syncDone?: number; startedMs: number };
    sync?: { equalBytes: number };
    applied?: { ops: number; bytes: number };
  }>;
  mirror?: {
    peer?: string; link?: string; health?: string;
    connections: Array<{ status: string }>;
    heartbeat?: { sent: number; received: number; ignored: Record<string, number>; lastReceivedMs: number | null; rttMs: number | null };
    authentication?: { refused: number; failedOutgoing: number };
  } | null;
  hostTls?: { established: number; failed: number } | null;
}

/** Protection values that mean the peer holds (or is about to hold) every acknowledged write. */
const PEER_PROTECTED = new Set(['peer', 'peer-async']);

export class Metrics {
  readonly registry = new client.Registry();
  private readonly latency: client.Histogram<'lun' | 'op'>;
  private readonly siteLatency: client.Histogram<'op'>;

  constructor(snapshot: () => MetricsSnapshot) {
    const r = this.registry;
    // The standard process_* and nodejs_* names, unprefixed, so stock dashboards and alerts work.
    client.collectDefaultMetrics({ register: r });
    // prom-client also exports nodejs_active_{handles,requests,resources}_total as gauges: the
    // same numbers as the labelled nodejs_active_* gauges, and a _total suffix is for counters.
    for (const m of r.getMetricsAsArray()) {
      if (m.name.endsWith('_total') && (m as unknown as { type?: string }).type === 'gauge') r.removeSingleMetric(m.name);
    }
    this.latency = new client.Histogram({
      name: 'nbd_mirror_request_duration_seconds',
      help: 'Host READ and WRITE latency per LUN, from the request read to its reply queued (every command: nbd_mirror_site_request_duration_seconds).',
      labelNames: ['lun', 'op'],
      buckets: LUN_LATENCY_BUCKETS,
      registers: [r],
    });
    this.siteLatency = new client.Histogram({
      name: 'nbd_mirror_site_request_duration_seconds',
      help: 'Host request latency over all LUNs of the site, by command, from the request read to its reply queued.',
      labelNames: ['op'],
      buckets: SITE_LATENCY_BUCKETS,
      registers: [r],
    });

    let snap: MetricsSnapshot | null = null;
    const current = (): MetricsSnapshot => (snap ??= snapshot());
    // One snapshot per scrape: the first collector takes it, a microtask later it is dropped.
    const take = () => { const s = current(); queueMicrotask(() => { snap = null; }); return s; };

    const perLun = (name: string, help: string, pick: (l: MetricsSnapshot['luns'][number]) => number | undefined | null, counter = false) => {
      const opts = { name, help, labelNames: ['lun'] as const, registers: [r] };
      if (counter) {
        new client.Counter({
          ...opts,
          collect() {
            this.reset();
            for (const l of take().luns) { const v = pick(l); if (v != null) this.labels(l.name).inc(v); }
          },
        });
      } else {
        new client.Gauge({
          ...opts,
          collect() {
            this.reset();
            for (const l of take().luns) { const v = pick(l); if (v != null) this.labels(l.name).set(v); }
          },
        });
      }
    };
    perLun('nbd_mirror_lun_read_ops_total', 'Host READ requests.', (l) => l.counters.readOps, true);
    perLun('nbd_mirror_lun_read_bytes_total', 'Bytes read by hosts.', (l) => l.counters.readBytes, true);
    perLun('nbd_mirror_lun_write_ops_total', 'Host WRITE requests.', (l) => l.counters.writeOps, true);
    perLun('nbd_mirror_lun_write_bytes_total', 'Bytes written by hosts.', (l) => l.counters.writeBytes, true);
    perLun('nbd_mirror_lun_errors_total', 'Host requests that failed on the backing store.', (l) => l.counters.errors, true);
    perLun('nbd_mirror_mirrored_ops_total', 'Mirror requests sent to the peer.', (l) => l.mirrored?.ops, true);
    perLun('nbd_mirror_mirrored_bytes_total', 'Bytes sent to the peer.', (l) => l.mirrored?.bytes, true);
    perLun('nbd_mirror_mirror_failures_total', 'Mirror requests that failed (link or peer).', (l) => l.mirrored?.failures, true);
    perLun('nbd_mirror_mirror_inflight_requests', 'Mirror requests issued and not yet answered.', (l) => l.inflight);
    perLun('nbd_mirror_async_lag_bytes', 'Bytes of mirror requests in flight (async lag).', (l) => l.lagBytes);
    perLun('nbd_mirror_journal_records', 'Records in the LUN journal.', (l) => l.journal?.records);
    perLun('nbd_mirror_journal_bytes', 'Bytes in the LUN journal.', (l) => l.journal?.bytes);
    perLun('nbd_mirror_journal_oldest_record_age_seconds', 'Age of the oldest journal record: the recovery point while the peer is away.',
      (l) => (l.journal ? (l.journal.oldestAgeMs ?? 0) / 1000 : undefined));
    perLun('nbd_mirror_dirty_regions', 'Regions marked in the dirty-region bitmap.', (l) => l.dirtyRegions);
    perLun('nbd_mirror_replay_progress_ratio', 'Journal replay progress (0..1).',
      (l) => (l.progress && l.progress.replayTotal ? l.progress.replayDone / l.progress.replayTotal : undefined));
    perLun('nbd_mirror_resync_progress_ratio', 'Bitmap resync progress (0..1).',
      (l) => (l.progress && l.progress.resyncTotal ? l.progress.resyncDone / l.progress.resyncTotal : undefined));
    perLun('nbd_mirror_sync_progress_ratio', 'Initial sync / full compare progress (0..1).',
      (l) => (l.progress && l.progress.syncTotal ? (l.progress.syncDone ?? 0) / l.progress.syncTotal : undefined));
    perLun('nbd_mirror_sync_equal_bytes_total', 'Bytes an initial sync found equal on the peer (not sent).', (l) => l.sync?.equalBytes, true);
    perLun('nbd_mirror_resynced_bytes_total', 'Bytes resent from local data (resync, initial sync, repair).', (l) => l.mirrored?.resyncedBytes, true);
    perLun('nbd_mirror_catchup_eta_seconds', 'Estimated time to finish the replay or resync under way.', (l) => catchupEta(l));
    perLun('nbd_mirror_secondary_applied_ops_total', 'Mirror requests applied to this secondary.', (l) => l.applied?.ops, true);
    perLun('nbd_mirror_lun_size_bytes', 'Size of the LUN (its export size).', (l) => l.size);
    perLun('nbd_mirror_lun_hosts', 'Host (NBD) connections to the LUN.', (l) => l.hosts);
    perLun('nbd_mirror_lun_peer_protected',
      'Mirrored primary LUNs: 1 while the peer copy protects acknowledged writes (uptodate), 0 while they are on this site only (outage, replay, resync, initial sync: see protection in status).',
      (l) => (l.protection == null ? undefined : PEER_PROTECTED.has(l.protection) ? 1 : 0));
    perLun('nbd_mirror_secondary_applied_bytes_total', 'Bytes applied to this secondary.', (l) => l.applied?.bytes, true);

    new client.Gauge({
      name: 'nbd_mirror_lun_state', help: 'Mirror state of each LUN (1 for the current state).',
      labelNames: ['lun', 'state'], registers: [r],
      collect() {
        this.reset();
        for (const l of take().luns) {
          for (const st of l.role === 'secondary' ? SECONDARY_STATES : PRIMARY_STATES) this.labels(l.name, st).set(l.state === st ? 1 : 0);
        }
      },
    });
    new client.Gauge({
      name: 'nbd_mirror_lun_info', help: 'Each LUN\'s role and mirror mode (value 1).',
      labelNames: ['lun', 'role', 'mode'], registers: [r],
      collect() {
        this.reset();
        for (const l of take().luns) this.labels(l.name, l.role, l.mode ?? '').set(1);
      },
    });
    new client.Gauge({
      name: 'nbd_mirror_link_state', help: 'Link to the peer as the heartbeats see it (1 for the current state; absent without a mirror section).',
      labelNames: ['state'], registers: [r],
      collect() {
        this.reset();
        const h = take().mirror?.health;
        if (h) for (const st of LINK_HEALTH_STATES) this.labels(st).set(h === st ? 1 : 0);
      },
    });
    new client.Gauge({
      name: 'nbd_mirror_link_up', help: 'The pool of mirror connections to the peer is up (1) or not (0).', registers: [r],
      collect() { this.set(take().mirror?.link === 'up' ? 1 : 0); },
    });
    new client.Gauge({
      name: 'nbd_mirror_build_info', help: 'nbd-mirror version and the Node.js running it (value 1).',
      labelNames: ['version', 'node'], registers: [r],
    }).labels(VERSION, process.version).set(1);
    new client.Gauge({
      name: 'nbd_mirror_peer_connections_up', help: 'Pool connections to the peer that are up.', registers: [r],
      collect() { this.set(take().mirror?.connections.filter((c) => c.status === 'up').length ?? 0); },
    });
    const hb = () => take().mirror?.heartbeat;
    new client.Counter({
      name: 'nbd_mirror_heartbeats_sent_total', help: 'Heartbeat datagrams sent to the peer.', registers: [r],
      collect() { this.reset(); this.inc(hb()?.sent ?? 0); },
    });
    new client.Counter({
      name: 'nbd_mirror_heartbeats_received_total', help: 'Valid heartbeat datagrams received from the peer.', registers: [r],
      collect() { this.reset(); this.inc(hb()?.received ?? 0); },
    });
    new client.Counter({
      name: 'nbd_mirror_heartbeats_ignored_total', help: 'Heartbeat datagrams ignored, by reason (malformed, wrong site, bad or missing signature, replayed, unproven new boot).',
      labelNames: ['reason'], registers: [r],
      collect() { this.reset(); for (const [k, v] of Object.entries(hb()?.ignored ?? {})) this.labels(k).inc(v); },
    });
    new client.Counter({
      name: 'nbd_mirror_peer_auth_refused_total',
      help: 'Mirror connections refused because TLS authentication failed (direction in: a peer connecting to us; out: our connection refused).',
      labelNames: ['direction'], registers: [r],
      collect() {
        this.reset();
        const a = take().mirror?.authentication;
        if (a) { this.labels('in').inc(a.refused); this.labels('out').inc(a.failedOutgoing); }
      },
    });
    new client.Counter({
      name: 'nbd_mirror_host_tls_handshakes_total', help: 'Host STARTTLS handshakes, by result.',
      labelNames: ['result'], registers: [r],
      collect() {
        this.reset();
        const t = take().hostTls;
        if (t) { this.labels('ok').inc(t.established); this.labels('failed').inc(t.failed); }
      },
    });
    new client.Counter({
      name: 'nbd_mirror_log_lines_lost_total', help: 'Log lines that could not be written (stdout closed or failing); the site keeps serving.',
      registers: [r],
      collect() { this.reset(); this.inc(logLinesLost()); },
    });
    // Labelled by peer so that "never heard" is no sample at all, not a reassuring 0.
    const peerOf = () => take().mirror?.peer || 'peer';
    new client.Gauge({
      name: 'nbd_mirror_heartbeat_silence_seconds', help: 'Time since the last valid heartbeat from the peer (absent until one arrived).',
      labelNames: ['peer'], registers: [r],
      collect() { this.reset(); const t = hb()?.lastReceivedMs; if (t != null) this.labels(peerOf()).set((Date.now() - t) / 1000); },
    });
    new client.Gauge({
      name: 'nbd_mirror_heartbeat_rtt_seconds', help: 'Heartbeat round-trip time to the peer (absent until measured).',
      labelNames: ['peer'], registers: [r],
      collect() { this.reset(); const rtt = hb()?.rttMs; if (rtt != null) this.labels(peerOf()).set(rtt / 1000); },
    });
  }

  /** Hook a LUN's hot path (its stats layer) into the latency histogram (children cached: no label lookups per request). */
  instrument(lun: { readonly name: string; latency: LatencyHook | null }): void {
    const children = new Map<number, { lun: client.Histogram.Internal<'lun' | 'op'> | null; site: client.Histogram.Internal<'op'> }>();
    for (const [type, op] of Object.entries(OPS)) {
      children.set(Number(type), { lun: LUN_OPS.has(op) ? this.latency.labels(lun.name, op) : null, site: this.siteLatency.labels(op) });
    }
    lun.latency = (type, seconds) => {
      const c = children.get(type);
      if (!c) return;
      c.site.observe(seconds);
      c.lun?.observe(seconds);
    };
  }

  forget(lun: string): void {
    for (const op of LUN_OPS) this.latency.remove(lun, op);
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }
}

function catchupEta(l: MetricsSnapshot['luns'][number]): number | undefined {
  return catchup(l.state, l.progress)?.etaSeconds ?? undefined;
}
