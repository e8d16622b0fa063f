// The sending side of a site: the pool toward the peer, driven by the heartbeat link monitor.
// Heartbeats refresh every element of the connection array; after each heartbeat sent, an
// element silent for longer than the timeout brings the session down; after an outage the
// pool is re-established only once the monitor's probation has passed.
import type { Heartbeat } from '../health/heartbeat.js';
import { LinkMonitor } from '../health/link-monitor.js';
import type { Logger } from '../log.js';
import { LunMirror, type MirrorStore } from './primary/lun-mirror.js';
import type { LunMeta } from '../persist/lun-meta.js';
import type { Backing } from '../storage/backing.js';
import type { MirrorTransport } from '../security/mirror-tls.js';
import { RateLimiter } from './primary/rate-limit.js';
import { MirrorPool } from './pool.js';

/**
 * Requests unanswered for this long count as a dead connection (TCP black-holed while heartbeats
 * flow). Generous: a busy peer applying a large backlog must not look dead.
 */
const STALL_FACTOR = 4;
const STALL_MIN_MS = 15000;

/** What the sender needs of the site's mirror section (config/schema.ts MirrorConfig extends it). */
export interface SenderConfig {
  peer: { host: string; port: number; site: string };
  connections: number;
  connectTimeoutMs: number;
  reconnectMs: number;
  asyncWindowBytes: number;
  syncRateBytes: number;
  heartbeat: { intervalMs: number; timeoutMs: number; probationMs: number };
}

/** A primary LUN as the sender mirrors it. */
export interface MirroredLun { name: string; mode: 'sync' | 'async'; backing: Backing; meta: LunMeta }

export class MirrorSender {
  readonly pool: MirrorPool;
  readonly monitor: LinkMonitor;
  private readonly mirrored: LunMirror[] = [];
  private running = false;
  private connecting = false;
  private lastAttemptMs = 0;
  /** Shared by every LUN's initial sync, resync and verify. */
  readonly syncRate: RateLimiter;

  constructor(site: string, private readonly cfg: SenderConfig, transport: MirrorTransport, private readonly log: Logger) {
    this.pool = new MirrorPool({
      site, peerHost: cfg.peer.host, peerPort: cfg.peer.port, peerSite: cfg.peer.site,
      connections: cfg.connections, connectTimeoutMs: cfg.connectTimeoutMs,
    }, transport, log);
    this.syncRate = new RateLimiter(cfg.syncRateBytes);
    this.monitor = new LinkMonitor(cfg.heartbeat);
    this.monitor.on('state', (from, to, reason) => this.log.info('mirror link state', { from, to, reason }));
    this.monitor.on('down', (reason) => this.pool.disconnect(reason));
    this.monitor.on('ready', () => this.connect());
    this.pool.on('up', (answers) => {
      this.monitor.connected();
      this.log.info('mirror link up', { peer: this.pool.peerSite, connections: this.pool.elements.length });
      this.mirrored.forEach((m, id) => m.paired(answers.find((a) => a.id === id)));
    });
    this.pool.on('reoffer', () => this.resession('the peer\'s LUNs changed'));
    this.pool.on('down', (reason) => {
      this.monitor.connectionLost(reason);
      for (const m of this.mirrored) m.linkDown(reason);
    });
  }

  /** Give a primary LUN (mode sync or async) its mirror, over its journal and bitmap. */
  attach(lun: MirroredLun, store: MirrorStore): LunMirror {
    const m = new LunMirror(lun.name, lun.mode, lun.backing, this.pool, store, this.cfg.asyncWindowBytes, this.log, lun.meta, this.syncRate);
    m.renegotiate = (reason) => this.resession(reason);
    this.mirrored.push(m);
    return m;
  }

  start(heartbeat: Heartbeat): void {
    this.running = true;
    heartbeat.on('beat', (now) => {
      this.monitor.beat();
      for (const e of this.pool.elements) if (e.status === 'up' && e.lastSeen < now) e.lastSeen = now;
    });
    heartbeat.on('tick', (now) => {
      this.monitor.tick();
      for (const m of this.mirrored) {
        m.persistClears().catch((err: Error) => this.log.error('bitmap write failed', { lun: m.name, error: err.message }));
      }
      const { timeoutMs } = this.cfg.heartbeat;
      const silent = this.pool.elements.find((e) => e.status === 'up' && now - e.lastSeen > timeoutMs);
      // Heartbeats can flow while TCP is black-holed: requests unanswered for long also end the session.
      const stallMs = Math.max(STALL_FACTOR * timeoutMs, STALL_MIN_MS);
      const stalled = this.pool.elements.find((e) => e.status === 'up' && e.stalledFor(now) > stallMs);
      if (silent) this.pool.disconnect(`connection ${silent.index} silent for ${now - silent.lastSeen} ms`);
      else if (stalled) this.pool.disconnect(`connection ${stalled.index}: no answer for ${stalled.stalledFor(now)} ms`);
      else this.connect();
    });
  }

  private connect(): void {
    if (!this.running || this.connecting || this.mirrored.length === 0) return;
    if (this.pool.state !== 'down' || !this.monitor.mayConnect()) return;
    if (Date.now() - this.lastAttemptMs < this.cfg.reconnectMs) return;
    this.connecting = true;
    this.lastAttemptMs = Date.now();
    const offers = this.mirrored.map((m, id) => m.offer(id, m.size));
    void this.pool.connect(offers).finally(() => { this.connecting = false; });
  }

  /** Stop mirroring a LUN (removed by a reload); the session restarts with the new offers. */
  detach(m: LunMirror): void {
    const i = this.mirrored.indexOf(m);
    if (i < 0) return;
    this.mirrored.splice(i, 1);
    this.resession(`LUN ${m.name} removed`);
  }

  /** Re-establish the session without an outage (offers changed): no probation, writes journal meanwhile. */
  resession(reason: string): void {
    if (this.pool.state === 'down') return;
    this.monitor.restart(reason);
    this.pool.disconnect(`renegotiating: ${reason}`);
  }

  /** Let mirror requests already issued reach the peer (async mode), for at most timeoutMs. */
  async drain(timeoutMs: number): Promise<void> {
    await Promise.all(this.mirrored.map((m) => m.drain(timeoutMs)));
  }

  stop(): void {
    this.running = false;
    this.pool.disconnect('shutting down');
  }
}
