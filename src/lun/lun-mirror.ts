// The sending half of one primary LUN's mirror: sequence numbers, the dependency each request
// carries, the async in-flight window, flush barriers, and the LUN's mirror state.
//
// Ordering: every mirrored change gets the next per-LUN sequence number and a `dep`: the
// highest sequence whose local write had completed when this one was issued. The secondary
// applies a request only once every request up to its `dep` is applied. With the overlap gate
// (an overlapping write starts only after the earlier one completed locally) this means: never
// an older write over a newer overlapping one, and never a write before one the host saw
// complete before issuing it.
import crypto from 'node:crypto';
import type { Logger } from '../log.js';
import { ENOTCONN, type MirrorOp } from '../mirror/peer-connection.js';
import type { MirrorPool } from '../mirror/pool.js';
import { MIRROR_OP, PAIR, PAIR_REASON, type LunAnswer, type LunOffer } from '../mirror/wire.js';
import type { MirrorMode } from './lun.js';

export type MirrorState = 'connecting' | 'uptodate' | 'degraded' | 'unpaired';

class PendingOp implements MirrorOp {
  reqId = 0;
  resolve: ((errno: number) => void) | null = null;
  constructor(
    readonly owner: LunMirror,
    readonly type: number, readonly flags: number, readonly lunId: number,
    readonly seq: number, readonly dep: number, readonly offset: number, readonly length: number,
    readonly payload: Buffer | null,
  ) {}

  done(errno: number): void {
    this.owner.completed(this, errno);
    this.resolve?.(errno);
  }
}

export class LunMirror {
  state: MirrorState = 'connecting';
  reason = 'waiting for the peer';
  /** Identifies this run of the primary to the secondary (sequence numbers restart with it). */
  readonly instance = crypto.randomBytes(8);
  readonly stats = { ops: 0, bytes: 0, failures: 0 };
  private lunId = -1;
  private nextSeq = 1;
  private doneHigh = 0;
  /** Every request up to here was answered; `answered` holds the ones answered beyond it. */
  private ackedPrefix = 0;
  private readonly answered = new Set<number>();
  private flushWaiters: { target: number; resolve: () => void }[] = [];
  private windowWaiters: (() => void)[] = [];
  inflightBytes = 0;

  constructor(
    readonly lun: string,
    readonly mode: Exclude<MirrorMode, 'none'>,
    private readonly pool: MirrorPool,
    private readonly windowBytes: number,
    private readonly log: Logger,
  ) {}

  /** Mirroring is on: requests go to the peer. */
  get active(): boolean {
    return this.state === 'uptodate';
  }

  get inflight(): number {
    return this.nextSeq - 1 - this.ackedPrefix;
  }

  offer(id: number, size: number): LunOffer {
    this.lunId = id;
    return { id, name: this.lun, size, instance: this.instance, nextSeq: this.ackedPrefix + 1 };
  }

  /** The peer answered our offer for this LUN. */
  paired(answer: LunAnswer | undefined): void {
    if (this.state === 'degraded') return;   // diverged: only a resync can bring it back
    if (!answer) return this.transition('unpaired', 'the peer did not answer for this LUN');
    if (answer.status !== PAIR.OK) return this.transition('unpaired', PAIR_REASON[answer.status] ?? `refused (${answer.status})`);
    this.transition('uptodate', 'paired with the peer');
  }

  /** The pool went down. Nothing was lost unless a request failed (that degrades the LUN). */
  linkDown(reason: string): void {
    if (this.state === 'uptodate' || this.state === 'unpaired') this.transition('connecting', `link down: ${reason}`);
  }

  /** Async back-pressure: wait until the window has room for `bytes` more. */
  admit(bytes: number): Promise<void> | void {
    if (this.mode !== 'async' || this.inflightBytes + bytes <= this.windowBytes || this.inflightBytes === 0) return;
    return new Promise((resolve) => this.windowWaiters.push(resolve));
  }

  /** Issue a change to the peer; resolves with 0 or an errno when the peer answered. */
  send(type: number, flags: number, offset: number, length: number, payload: Buffer | null): Promise<number> {
    const seq = this.nextSeq++;
    const op = new PendingOp(this, type, flags, this.lunId, seq, this.doneHigh, offset, length, payload);
    this.inflightBytes += length;
    this.stats.ops++;
    this.stats.bytes += length;
    const p = new Promise<number>((resolve) => { op.resolve = resolve; });
    this.pool.send(op);
    return p;
  }

  /** Sequence number of the request send() issued last. */
  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  /** The local write of a mirrored request failed: the peer may now hold data this site lacks. */
  localFailed(seq: number, err: Error): void {
    this.log.error('local write failed after it was mirrored; copies may differ in that range', {
      lun: this.lun, seq, error: err.message,
    });
    this.transition('degraded', `local write of seq ${seq} failed: ${err.message}`);
  }

  /** The local half of request `seq` completed: later requests depend on it. */
  localDone(seq: number): void {
    if (seq > this.doneHigh) this.doneHigh = seq;
  }

  /** Every request issued so far answered, then the peer's FLUSH. 0 or an errno. */
  async flush(): Promise<number> {
    const target = this.nextSeq - 1;
    if (this.ackedPrefix < target) await new Promise<void>((resolve) => this.flushWaiters.push({ target, resolve }));
    if (!this.active) return ENOTCONN;
    const op = new PendingOp(this, MIRROR_OP.FLUSH, 0, this.lunId, 0, 0, 0, 0, null);
    const p = new Promise<number>((resolve) => { op.resolve = resolve; });
    this.pool.send(op);
    return p;
  }

  /** A request was answered (or failed): bookkeeping, window, barriers, failure handling. */
  completed(op: PendingOp, errno: number): void {
    if (op.type === MIRROR_OP.FLUSH) {
      // Every write before the flush was answered already; a flush the link cut off loses none.
      if (errno !== 0 && errno !== ENOTCONN) this.failed(op, errno);
      return;
    }
    if (errno !== 0) this.failed(op, errno);
    this.inflightBytes -= op.length;
    this.answered.add(op.seq);
    while (this.answered.delete(this.ackedPrefix + 1)) this.ackedPrefix++;
    if (this.flushWaiters.length) {
      const ready = this.flushWaiters.filter((w) => w.target <= this.ackedPrefix);
      this.flushWaiters = this.flushWaiters.filter((w) => w.target > this.ackedPrefix);
      for (const w of ready) w.resolve();
    }
    while (this.windowWaiters.length && this.inflightBytes < this.windowBytes) this.windowWaiters.shift()!();
  }

  private failed(op: PendingOp, errno: number): void {
    this.stats.failures++;
    if (this.state !== 'degraded') {
      const why = errno === ENOTCONN ? 'a mirror request was cut off by the link failure'
        : `the peer failed a mirror ${op.type === MIRROR_OP.FLUSH ? 'flush' : 'request'} (errno ${errno})`;
      this.transition('degraded', op.type === MIRROR_OP.FLUSH ? why : `${why}; the secondary may lack writes from seq ${op.seq}`);
    }
  }

  private transition(to: MirrorState, reason: string): void {
    if (this.state === to && this.reason === reason) return;
    const from = this.state;
    this.state = to;
    this.reason = reason;
    const level = to === 'degraded' || to === 'unpaired' ? 'warn' : 'info';
    this.log.log(level, 'LUN mirror state', { lun: this.lun, from, to, reason });
  }
}
