// Receiver-side ordering for one secondary LUN. Requests arrive over n connections in any
// order; one is applied only once every request up to its `dep` has been applied (see
// mirror/primary/lun-mirror.ts for why that is enough), and a sequence number already applied is
// acknowledged without being applied again.

export class ApplyOrder {
  /** The primary run these sequence numbers belong to. */
  instance: Buffer | null = null;
  /** Every request up to here is applied; `above` holds the ones applied beyond it. */
  appliedPrefix = 0;
  private readonly above = new Set<number>();
  private waiters: { dep: number; owner: object | null; resolve: () => void }[] = [];
  private readonly inflight = new Map<number, Promise<void>>();

  /** Bumped when a new primary run takes over: requests of the old run still waiting must not apply. */
  epoch = 0;

  /** A restarted secondary: continue from the point it recorded (persist/applied-point.ts). */
  restore(instance: Buffer, appliedPrefix: number): void {
    this.instance = Buffer.from(instance);
    this.appliedPrefix = appliedPrefix;
    this.above.clear();
  }

  /** A primary (re)connected: adopt its run, or skip ahead to where it says it resumes. */
  resume(instance: Buffer, nextSeq: number): void {
    if (!this.instance || !this.instance.equals(instance)) {
      this.instance = Buffer.from(instance);
      this.appliedPrefix = nextSeq - 1;
      this.above.clear();
      this.epoch++;
      // Wake the old run's waiters; they see the new epoch and drop their request.
      for (const w of this.waiters.splice(0)) w.resolve();
    } else if (nextSeq - 1 > this.appliedPrefix) {
      this.appliedPrefix = nextSeq - 1;
      for (const s of this.above) if (s <= this.appliedPrefix) this.above.delete(s);
      this.advance();
    }
    this.release();
  }

  isApplied(seq: number): boolean {
    return seq <= this.appliedPrefix || this.above.has(seq);
  }

  /** Resolves (or returns null at once) when every request up to `dep` is applied, or `owner` is dropped. */
  ready(dep: number, owner: object | null = null): Promise<void> | null {
    if (dep <= this.appliedPrefix) return null;
    return new Promise((resolve) => this.waiters.push({ dep, owner, resolve }));
  }

  /** Release (unapplied) every request `owner` still has waiting: its connection is gone. */
  drop(owner: object): void {
    const keep: typeof this.waiters = [];
    for (const w of this.waiters) {
      if (w.owner === owner) w.resolve();
      else keep.push(w);
    }
    this.waiters = keep;
  }

  /** The application of `seq` under way, if any. */
  running(seq: number): Promise<void> | undefined {
    return this.inflight.get(seq);
  }

  /** Apply `seq` with `fn`; on success it counts as applied. */
  async run(seq: number, fn: () => Promise<void>): Promise<void> {
    const p = fn();
    this.inflight.set(seq, p);
    try {
      await p;
      this.applied(seq);
    } finally {
      this.inflight.delete(seq);
    }
  }

  applied(seq: number): void {
    if (seq <= this.appliedPrefix) return;
    this.above.add(seq);
    this.advance();
    this.release();
  }

  get waiting(): number {
    return this.waiters.length;
  }

  private advance(): void {
    while (this.above.delete(this.appliedPrefix + 1)) this.appliedPrefix++;
  }

  private release(): void {
    if (this.waiters.length === 0) return;
    const still: typeof this.waiters = [];
    for (const w of this.waiters) {
      if (w.dep <= this.appliedPrefix) w.resolve();
      else still.push(w);
    }
    this.waiters = still;
  }
}
