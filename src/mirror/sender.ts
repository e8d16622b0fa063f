// The sending side of a site: brings the pool up with an offer for every mirrored primary LUN,
// hands each LUN the peer's verdict, and reconnects after the link fails.
import type { MirrorConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import { LunMirror } from '../lun/lun-mirror.js';
import type { Lun } from '../lun/lun.js';
import { MirrorPool } from './pool.js';

export class MirrorSender {
  readonly pool: MirrorPool;
  private readonly mirrored: Lun[] = [];
  private running = false;
  private timer: NodeJS.Timeout | null = null;

  constructor(site: string, private readonly cfg: MirrorConfig, private readonly log: Logger) {
    this.pool = new MirrorPool({
      site, peerHost: cfg.peer.host, peerPort: cfg.peer.port, peerSite: cfg.peer.site,
      connections: cfg.connections, connectTimeoutMs: cfg.connectTimeoutMs,
    }, log);
    this.pool.on('up', (answers) => {
      this.log.info('mirror link up', { peer: this.pool.peerSite, connections: this.pool.elements.length });
      this.mirrored.forEach((lun, id) => lun.mirror!.paired(answers.find((a) => a.id === id)));
    });
    this.pool.on('down', (reason) => {
      for (const lun of this.mirrored) lun.mirror!.linkDown(reason);
      this.schedule();
    });
  }

  /** Give a primary LUN its mirror (mode sync or async). */
  attach(lun: Lun): void {
    const mode = lun.spec.mirror;
    if (mode === 'none') return;
    lun.mirror = new LunMirror(lun.name, mode, this.pool, this.cfg.asyncWindowBytes, this.log);
    this.mirrored.push(lun);
  }

  start(): void {
    if (this.mirrored.length === 0) return;
    this.running = true;
    void this.connect();
  }

  private async connect(): Promise<void> {
    this.timer = null;
    if (!this.running || this.pool.state !== 'down') return;
    const offers = this.mirrored.map((lun, id) => lun.mirror!.offer(id, lun.size));
    const up = await this.pool.connect(offers);
    if (!up) this.schedule();
  }

  private schedule(): void {
    if (!this.running || this.timer) return;
    this.timer = setTimeout(() => void this.connect(), this.cfg.reconnectMs);
  }

  /** Let mirror requests already issued reach the peer (async mode), for at most timeoutMs. */
  async drain(timeoutMs: number): Promise<void> {
    const active = this.mirrored.filter((l) => l.mirror!.active);
    if (active.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const late = await Promise.race([
      Promise.all(active.map((l) => l.mirror!.flush())).then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), timeoutMs); }),
    ]);
    clearTimeout(timer);
    if (late) this.log.warn('shutdown: mirror requests still in flight after the timeout', { timeoutMs });
  }

  stop(): void {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.pool.disconnect('shutting down');
  }
}
