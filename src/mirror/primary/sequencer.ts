// Sequence numbers of one primary LUN's mirror and what waits on the peer's answers: the acked
// prefix (every request up to it answered), the answered set beyond it, the requests kept until
// the prefix passes them, flushes waiting for the prefix to reach their target, and the async
// window. Pure bookkeeping (no I/O): the twin of the receiver's ApplyOrder (secondary/apply-order.ts).
//
// Numbers stay dense from the acked prefix on (see lun-mirror.ts): after an outage every kept
// request above the prefix is journaled, so a replay re-sends each number the peer may wait for.

export class Sequencer<T extends { readonly seq: number }> {
  /** The next number to hand out. */
  nextSeq = 1;
  /** The highest sequence whose local write completed: the `dep` of the next request. */
  doneHigh = 0;
  /** Every request up to here was answered; `answered` holds answered ones beyond it. */
  ackedPrefix = 0;
  /** Bytes of live/resync requests sent and not yet released (the async window's fill). */
  inflightBytes = 0;
  private readonly answered = new Set<number>();
  /** Requests above the acked prefix, kept (with payload) until the prefix passes them. */
  private readonly tracked = new Map<number, T>();
  private flushWaiters: { target: number; resolve: () => void }[] = [];
  private windowWaiters: (() => void)[] = [];

  constructor(readonly windowBytes: number) {}

  /** After a restart: continue after the journal's records; the peer has everything below `ackedPrefix + 1`. */
  restore(maxSeq: number, ackedPrefix: number): void {
    this.nextSeq = maxSeq + 1;
    this.ackedPrefix = ackedPrefix;
    this.doneHigh = maxSeq;
  }

  /** Requests issued and not yet answered in order. */
  get inflight(): number {
    return this.nextSeq - 1 - this.ackedPrefix;
  }

  /** The last number handed out. */
  get issued(): number {
    return this.nextSeq - 1;
  }

  take(): number {
    return this.nextSeq++;
  }

  /** The local write of `seq` completed: later requests depend on it. */
  localDone(seq: number): void {
    if (seq > this.doneHigh) this.doneHigh = seq;
  }

  /** Keep `op` (sent, `bytes` of the window) until the acked prefix passes it. */
  track(op: T, bytes: number): void {
    this.tracked.set(op.seq, op);
    this.inflightBytes += bytes;
  }

  /** The peer answered `seq` (success): advance the prefix, release flushes it satisfies. */
  answer(seq: number): void {
    this.answered.add(seq);
    while (this.answered.delete(this.ackedPrefix + 1)) {
      this.ackedPrefix++;
      this.tracked.delete(this.ackedPrefix);
    }
    this.releaseFlushWaiters();
  }

  /**
   * The peer says it has applied every request of this run up to `applied` (it records that
   * point durably): requests it answered before a cut whose replies we lost count as answered.
   */
  resumeAfter(applied: number): void {
    if (!(applied > this.ackedPrefix && applied < this.nextSeq)) return;
    for (let s = this.ackedPrefix + 1; s <= applied; s++) {
      this.tracked.delete(s);
      this.answered.delete(s);
    }
    this.ackedPrefix = applied;
    while (this.answered.delete(this.ackedPrefix + 1)) this.tracked.delete(++this.ackedPrefix);
  }

  /** The link failed: hand over every kept request, in sequence order, to be journaled. */
  takeTracked(): T[] {
    const ops = [...this.tracked.values()].sort((a, b) => a.seq - b.seq);
    this.tracked.clear();
    return ops;
  }

  /** After takeTracked(): answers that will not count now are forgotten; waiting flushes fall back to the journal. */
  abandon(): void {
    this.answered.clear();
    for (const w of this.flushWaiters.splice(0)) w.resolve();
  }

  /** The journal was dropped: nothing issued so far is outstanding (a resync stands for it). */
  skipAll(): void {
    this.answered.clear();
    this.ackedPrefix = this.nextSeq - 1;
    this.releaseFlushWaiters();
  }

  /** Resolves once every request up to `target` is answered (or abandoned); null if it already is. */
  ackedTo(target: number): Promise<void> | null {
    if (this.ackedPrefix >= target) return null;
    return new Promise<void>((resolve) => this.flushWaiters.push({ target, resolve }));
  }

  /** Async back-pressure: resolves once the window has room for `bytes` more; nothing if it has now. */
  admit(bytes: number): Promise<void> | void {
    if (this.inflightBytes === 0 || this.inflightBytes + bytes <= this.windowBytes) return;
    return new Promise((resolve) => this.windowWaiters.push(resolve));
  }

  /** `bytes` of the window are free again (admitWaiting() then lets writes in). */
  release(bytes: number): void {
    this.inflightBytes -= bytes;
  }

  /** Let waiting writes in while the window has room. */
  admitWaiting(): void {
    while (this.windowWaiters.length && this.inflightBytes < this.windowBytes) this.windowWaiters.shift()!();
  }

  private releaseFlushWaiters(): void {
    if (this.flushWaiters.length === 0) return;
    const ready = this.flushWaiters.filter((w) => w.target <= this.ackedPrefix);
    this.flushWaiters = this.flushWaiters.filter((w) => w.target > this.ackedPrefix);
    for (const w of ready) w.resolve();
  }
}
