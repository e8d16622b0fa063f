// The single writer of a durable file: writes (and barriers) run one at a time, in call order,
// so a crash leaves every completed write intact plus at most a prefix of the one in flight.
// Queued items are written in batches (one writev); a barrier runs alone once everything queued
// before it is done (reset, truncation, close, a metadata save). After a write or sync has left
// the file in an unknown state the owner latches the failure: queued items are refused from then
// on, and the owner refuses new calls (each owner words its own messages).

/** The first failure that left a file's state unknown (failed fdatasync, failed roll-back). */
export class FailureLatch {
  private err: Error | null = null;

  get failure(): Error | null { return this.err; }

  /** Latch `err` unless a failure is latched already; returns the latched one. */
  latch(err: Error): Error {
    return (this.err ??= err);
  }
}

/**
 * Limits of a batch of (header, data) records written with one writev: 2 iovecs a record
 * (IOV_MAX is 1024), and no more records once it holds 16 MiB. The journal and undo log use them.
 */
export const WRITEV_MAX_RECORDS = 512;
export const WRITEV_MAX_BYTES = 16 * 1024 * 1024;

class Barrier {
  constructor(readonly run: () => Promise<void>, readonly resolve: () => void, readonly reject: (err: Error) => void) {}
}

export interface BatchOptions<T> {
  /** Write one batch and settle its items (resolve or reject them); must not reject itself. */
  write: (batch: T[]) => Promise<void>;
  /** Refuse an item that reaches the head of the queue after the latch was set. */
  refuse: (item: T, failure: Error) => void;
  /** A batch holds at most `maxItems` items and stops growing once it holds `maxBytes` bytes. */
  maxItems: number;
  maxBytes: number;
  bytes: (item: T) => number;
  /** An item to drop unwritten (its caller has given up on it). */
  dropped?: (item: T) => boolean;
}

export class SerialWriter<T = never> {
  readonly latch = new FailureLatch();
  private queue: Array<T | Barrier> = [];
  private writing = false;

  /** Without `batch`, the writer runs barriers only. */
  constructor(private readonly batch?: BatchOptions<T>) {}

  get failure(): Error | null { return this.latch.failure; }

  /** Queue `item`; the batch's write() settles it. */
  enqueue(item: T): void {
    if (!this.batch) throw new Error('this SerialWriter runs barriers only');
    this.queue.push(item);
    this.pump();
  }

  /** Queue all of `items` before the writer looks at the queue (so they can share one batch). */
  enqueueAll(items: readonly T[]): void {
    if (!this.batch) throw new Error('this SerialWriter runs barriers only');
    for (const item of items) this.queue.push(item);
    this.pump();
  }

  /** Run `run` once everything queued before is written (or refused), alone; nothing queued after starts before it ends. */
  barrier(run: () => Promise<void>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push(new Barrier(run, resolve, reject));
      this.pump();
    });
  }

  private pump(): void {
    while (!this.writing && this.queue.length > 0) {
      const first = this.queue[0];
      if (first instanceof Barrier) {
        this.queue.shift();
        this.writing = true;
        first.run().then(first.resolve, first.reject).finally(() => {
          this.writing = false;
          this.pump();
        });
        return;
      }
      const opts = this.batch!;
      let n = 0;
      let bytes = 0;
      while (n < this.queue.length && n < opts.maxItems && bytes < opts.maxBytes) {
        const item = this.queue[n];
        if (item instanceof Barrier) break;
        bytes += opts.bytes(item);
        n++;
      }
      // The whole queue is the usual case: no copy then.
      const all = n === this.queue.length;
      let batch = (all ? this.queue : this.queue.slice(0, n)) as T[];
      this.queue = all ? [] : this.queue.slice(n);
      if (opts.dropped) {
        batch = batch.filter((item) => !opts.dropped!(item));
        if (batch.length === 0) continue;
      }
      const failure = this.latch.failure;
      if (failure) {   // accepted before the failure: refuse now rather than write
        for (const item of batch) opts.refuse(item, failure);
        continue;
      }
      this.writing = true;
      const done = (): void => {
        this.writing = false;
        this.pump();
      };
      opts.write(batch).then(done, done);
      return;
    }
  }
}

/**
 * Group commit for one file descriptor. `level()` is a monotonic count of completed writes;
 * sync() resolves once an fdatasync that started at or after the level seen at call time has
 * completed. At most one fdatasync is in flight and one queued; every caller in between shares them.
 */
export class GroupSync {
  private synced = 0;
  private inflight: { covers: number; promise: Promise<void> } | null = null;
  private queued: { promise: Promise<void>; resolve: () => void; reject: (err: Error) => void } | null = null;

  constructor(private readonly doSync: () => Promise<void>, private readonly level: () => number) {}

  sync(): Promise<void> {
    const target = this.level();
    if (this.inflight) {
      if (this.inflight.covers >= target) return this.inflight.promise;
    } else if (this.synced >= target) {
      return Promise.resolve();
    }
    if (!this.queued) {
      let resolve!: () => void;
      let reject!: (err: Error) => void;
      const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
      this.queued = { promise, resolve, reject };
    }
    const p = this.queued.promise;
    if (!this.inflight) this.start();
    return p;
  }

  /** Resolves once nothing is in flight or queued (errors are the callers' business). */
  async idle(): Promise<void> {
    while (this.inflight) await this.inflight.promise.catch(() => undefined);
  }

  private start(): void {
    const q = this.queued!;
    this.queued = null;
    const covers = this.level();
    this.inflight = { covers, promise: q.promise };
    this.doSync().then(() => {
      if (covers > this.synced) this.synced = covers;
      this.inflight = null;
      q.resolve();
      if (this.queued) this.start();
    }, (err: Error) => {
      this.inflight = null;
      q.reject(err);
      if (this.queued) this.start();
    });
  }
}
