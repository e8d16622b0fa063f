// Assembles the site's status snapshot (admin/status.ts types) from its parts.
import type { AddressInfo } from 'node:net';
import { VERSION } from '../admin/metrics.js';
import type { GenerationStatus, LunStatus, SiteStatus } from '../admin/status.js';
import type { SiteConfig } from '../config/schema.js';
import type { Heartbeat } from '../health/heartbeat.js';
import { processStatus } from '../health/process-stats.js';
import type { Lun } from '../lun/lun.js';
import type { LunRegistry } from '../lun/registry.js';
import { catchup, protectionOf, protectionReason } from '../mirror/primary/protection.js';
import type { MirrorReceiver } from '../mirror/secondary/receiver.js';
import type { SecondaryStatus } from '../mirror/secondary/secondary-lun.js';
import type { MirrorSender } from '../mirror/sender.js';
import type { NbdServer } from '../nbd/server.js';
import type { MirrorTransport } from '../security/mirror-tls.js';
import type { MirrorStores } from './mirror-stores.js';

export interface StatusSources {
  config: SiteConfig;
  luns: LunRegistry;
  nbd: NbdServer;
  nbdAddress: AddressInfo | null;
  mirrorAddress: AddressInfo | null;
  sender: MirrorSender | null;
  receiver: MirrorReceiver | null;
  heartbeat: Heartbeat | null;
  transport: MirrorTransport | null;
  stores: MirrorStores;
}

export function siteStatus(src: StatusSources): SiteStatus {
  const mem = process.memoryUsage();
  const luns = src.luns.all().map((lun) => lunStatus(src, lun));
  const states = new Map<string, number>();
  for (const l of luns) states.set(l.state, (states.get(l.state) ?? 0) + 1);
  const { config, sender } = src;
  return {
    site: config.site,
    version: VERSION,
    process: {
      pid: process.pid, uptimeSeconds: Math.round(process.uptime()), node: process.version,
      ...processStatus(), heapUsedBytes: mem.heapUsed, heapTotalBytes: mem.heapTotal,
      externalBytes: mem.external, arrayBuffersBytes: mem.arrayBuffers,
    },
    listen: src.nbdAddress,
    hostTls: config.listen.tls === 'off' ? null : { mode: config.listen.tls, ...src.nbd.tlsStats },
    mirror: sender && {
      listen: src.mirrorAddress,
      peer: sender.pool.peerSite || config.mirror!.peer.site,
      link: sender.pool.state,
      health: sender.monitor.state,
      tls: src.transport!.mode,
      authentication: src.transport!.stats,
      heartbeat: src.heartbeat?.stats,
      connections: sender.pool.elements.map((e) => ({ index: e.index, status: e.status, lastSeen: e.lastSeen, inflight: e.inflight })),
    },
    luns,
    summary: {
      luns: luns.length,
      states: Object.fromEntries(states),
      localOnly: luns.flatMap((l) => ('protection' in l && l.protection === 'local-only' ? [l.name] : [])),
      journalBytes: luns.reduce((sum, l) => sum + ('journal' in l && l.journal ? l.journal.bytes : 0), 0),
    },
  };
}

/** A secondary with no secondary side (a site without a mirror section cannot feed one). */
const UNFED: SecondaryStatus = {
  state: 'secondary-waiting', peer: null, appliedSeq: 0, applied: { ops: 0, bytes: 0, flushes: 0, errors: 0 }, pairing: null, undoRegions: 0,
};

function generationOf(lun: Lun): GenerationStatus | undefined {
  const meta = lun.meta?.data;
  if (!meta) return undefined;
  const neverSynced = lun.role === 'secondary' && !!lun.meta?.neverSynced;
  return {
    current: meta.current, history: meta.history.slice(0, 4), consistent: neverSynced ? false : meta.consistent, localChanges: meta.localChanges,
    splitBrain: meta.splitBrain, peerBase: meta.peerBase || null, neverSynced,
    // A forced promote of a never-synced copy is remembered: this data is no state of the old primary.
    ...(meta.promotedNeverSynced ? { promotedNeverSynced: new Date(meta.promotedNeverSynced).toISOString(), dataOrigin: 'promoted without a completed initial sync: not a state of the old primary' } : {}),
  };
}

function lunStatus(src: StatusSources, lun: Lun): LunStatus {
  const base = {
    name: lun.name, path: lun.backing.path, size: lun.size, role: lun.role, mode: lun.mode as string,
    readOnly: lun.readOnly, hosts: src.nbd.connectionCount(lun.name), counters: lun.counters, generation: generationOf(lun),
  };
  if (lun.role === 'secondary') return { ...base, mode: 'secondary', ...(lun.secondary?.status() ?? UNFED) };
  const m = lun.mirror;
  if (!m) return { ...base, state: 'standalone' };
  const journal = m.journalStatus();
  // While the link waits out its probation, a LUN with changes to send shows it.
  const state = m.state === 'journaling' && src.sender!.monitor.state === 'probation' ? 'probation' : m.state;
  const work = catchup(state, m.progress);
  return {
    ...base, state, reason: m.reason, writePath: m.path,
    protection: protectionOf(state, m.mode), protectionReason: protectionReason(state),
    catchup: work && { done: work.done, total: work.total, percent: Math.floor((100 * work.done) / work.total) },
    etaSeconds: work?.etaSeconds ?? null,
    mirrored: m.stats, inflight: m.inflight, lagBytes: m.inflightBytes,
    journal, dirtyRegions: m.dirtyRegions, resyncPending: m.resyncNeeded.size,
    progress: m.progress, sync: m.sync, verify: m.verifying,
    recovery: src.stores.recovery(lun.name),
  };
}
