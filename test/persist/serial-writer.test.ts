// The persist kit's single writer: call order kept, batching within limits, barriers wait for
// earlier writes and hold back later ones, the failure latch refuses what was queued before it,
// dropped items are skipped; and GroupSync shares fdatasyncs. Every write here completes only
// when the test says so (no timers).
import { expect } from 'chai';
import { FailureLatch, GroupSync, SerialWriter, type BatchOptions } from '../../src/persist/serial-writer.js';

interface Item { id: number; size: number; dropped?: boolean; result?: 'ok' | Error }

interface Deferred { promise: Promise<void>; resolve: () => void; reject: (err: Error) => void }
function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

/** Let every pending promise callback run (a few macrotask turns: no timing involved). */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise<void>((r) => setImmediate(r));
}

/** A writer whose batches complete one by one when `complete()` is called; the log says what happened. */
function harness(opts: Partial<BatchOptions<Item>> = {}) {
  const log: string[] = [];
  const pending: Array<{ batch: Item[]; done: Deferred }> = [];
  const writer = new SerialWriter<Item>({
    write: (batch) => {
      log.push(`write ${batch.map((i) => i.id).join(',')}`);
      const done = deferred();
      pending.push({ batch, done });
      return done.promise.then(() => { for (const i of batch) i.result = 'ok'; });
    },
    refuse: (item, failure) => { item.result = failure; log.push(`refuse ${item.id}`); },
    maxItems: 100,
    maxBytes: 1 << 20,
    bytes: (i) => i.size,
    dropped: (i) => i.dropped === true,
    ...opts,
  });
  /** Complete the oldest batch in flight. */
  const complete = async (): Promise<void> => {
    const p = pending.shift();
    if (!p) throw new Error('no write in flight');
    p.done.resolve();
    await settle();
  };
  return { writer, log, pending, complete };
}

const item = (id: number, size = 10): Item => ({ id, size });

describe('persist kit: serial writer', () => {
  it('writes one batch at a time, in call order, batching what queued up meanwhile', async () => {
    const h = harness();
    const items = [1, 2, 3, 4, 5].map((id) => item(id));
    h.writer.enqueue(items[0]);                  // the writer is idle: written alone at once
    for (const i of items.slice(1, 4)) h.writer.enqueue(i);
    await settle();
    expect(h.log).to.deep.equal(['write 1']);    // nothing else starts while a write is in flight
    await h.complete();
    expect(h.log).to.deep.equal(['write 1', 'write 2,3,4']);
    h.writer.enqueue(items[4]);
    await h.complete();
    await h.complete();
    expect(h.log).to.deep.equal(['write 1', 'write 2,3,4', 'write 5']);
    expect(items.map((i) => i.result)).to.deep.equal(['ok', 'ok', 'ok', 'ok', 'ok']);
  });

  it('enqueueAll() puts its items in one batch; batches stop at maxItems and maxBytes', async () => {
    const h = harness({ maxItems: 3, maxBytes: 25 });
    h.writer.enqueueAll([item(1), item(2)]);
    await settle();
    expect(h.log).to.deep.equal(['write 1,2']);
    h.writer.enqueueAll([3, 4, 5, 6].map((id) => item(id, 1)));   // maxItems 3
    h.writer.enqueueAll([item(7, 20), item(8, 20), item(9, 1)]);   // 20+20 >= 25: stops after two
    await h.complete();
    await h.complete();
    await h.complete();
    await h.complete();
    expect(h.log).to.deep.equal(['write 1,2', 'write 3,4,5', 'write 6,7,8', 'write 9']);
  });

  it('a barrier runs only after every earlier write completed, and holds back later ones until it ends', async () => {
    const h = harness();
    h.writer.enqueue(item(1));
    h.writer.enqueue(item(2));
    const gate = deferred();
    const barrier = h.writer.barrier(async () => {
      h.log.push('barrier');
      await gate.promise;
      h.log.push('barrier end');
    });
    h.writer.enqueue(item(3));
    await settle();
    expect(h.log).to.deep.equal(['write 1']);
    await h.complete();
    expect(h.log).to.deep.equal(['write 1', 'write 2']);
    await h.complete();
    expect(h.log).to.deep.equal(['write 1', 'write 2', 'barrier']);
    gate.resolve();
    await barrier;
    await settle();
    expect(h.log).to.deep.equal(['write 1', 'write 2', 'barrier', 'barrier end', 'write 3']);
  });

  it('a failing barrier rejects its caller only; the writer goes on', async () => {
    const h = harness();
    const failed = h.writer.barrier(async () => { throw new Error('truncate failed'); });
    h.writer.enqueue(item(1));
    let caught: Error | null = null;
    await failed.catch((e: Error) => { caught = e; });
    expect(caught).to.be.an('error').with.property('message', 'truncate failed');
    await settle();
    expect(h.log).to.deep.equal(['write 1']);
  });

  it('the failure latch refuses every item queued behind the failed write, keeps the first failure, and lets barriers run', async () => {
    const h = harness();
    const items = [1, 2, 3].map((id) => item(id));
    for (const i of items) h.writer.enqueue(i);
    const first = new Error('fdatasync failed: EIO');
    expect(h.writer.latch.latch(first)).to.equal(first);
    expect(h.writer.latch.latch(new Error('later'))).to.equal(first);   // the first failure stays
    expect(h.writer.failure).to.equal(first);
    await h.complete();                        // item 1 was in flight before the failure
    expect(h.log).to.deep.equal(['write 1', 'refuse 2', 'refuse 3']);
    expect(items[1].result).to.equal(first);
    expect(items[2].result).to.equal(first);
    const late = item(4);
    h.writer.enqueue(late);                    // queued after the failure: refused, never written
    expect(late.result).to.equal(first);
    let ran = false;
    await h.writer.barrier(async () => { ran = true; });   // the owner's barrier decides what a failure means
    expect(ran).to.equal(true);
    expect(h.pending).to.have.length(0);
  });

  it('drops items its owner gave up on, and writes nothing for a batch of only those', async () => {
    const h = harness();
    h.writer.enqueue(item(1));
    const gone = { ...item(2), dropped: true };
    h.writer.enqueue(gone);
    h.writer.enqueue(item(3));
    await h.complete();
    const alone = { ...item(4), dropped: true };
    await h.complete();
    h.writer.enqueue(alone);
    await settle();
    expect(h.log).to.deep.equal(['write 1', 'write 3']);
    expect(gone.result).to.equal(undefined);
    expect(alone.result).to.equal(undefined);
  });

  it('without batch options runs barriers only, one at a time in call order', async () => {
    const w = new SerialWriter();
    const log: string[] = [];
    const gate = deferred();
    const a = w.barrier(async () => { log.push('a'); await gate.promise; log.push('a end'); });
    const b = w.barrier(async () => { log.push('b'); });
    await settle();
    expect(log).to.deep.equal(['a']);
    gate.resolve();
    await Promise.all([a, b]);
    expect(log).to.deep.equal(['a', 'a end', 'b']);
    expect(() => (w as unknown as SerialWriter<number>).enqueue(1)).to.throw(/barriers only/);
  });
});

describe('persist kit: failure latch and group sync', () => {
  it('FailureLatch keeps the first error', () => {
    const l = new FailureLatch();
    expect(l.failure).to.equal(null);
    const e1 = new Error('one');
    expect(l.latch(e1)).to.equal(e1);
    expect(l.latch(new Error('two'))).to.equal(e1);
    expect(l.failure).to.equal(e1);
  });

  it('GroupSync shares one fdatasync among callers it covers and starts another for later writes', async () => {
    let level = 0;
    const syncs: Deferred[] = [];
    const gs = new GroupSync(() => { const d = deferred(); syncs.push(d); return d.promise; }, () => level);
    expect(gs.sync()).to.be.a('promise');
    await settle();
    expect(syncs).to.have.length(0);          // level 0 is synced: no fdatasync needed
    level = 1;
    const a = gs.sync();
    const b = gs.sync();                      // covered by the one in flight
    expect(syncs).to.have.length(1);
    level = 2;
    const c = gs.sync();                      // a write completed after it started: needs another
    const d = gs.sync();                      // shares the queued one
    syncs[0].resolve();
    await Promise.all([a, b]);
    await settle();
    expect(syncs).to.have.length(2);
    let cDone = false;
    void c.then(() => { cDone = true; });
    await settle();
    expect(cDone).to.equal(false);
    syncs[1].resolve();
    await Promise.all([c, d]);
    await gs.sync();                          // level 2 is synced now
    expect(syncs).to.have.length(2);
  });

  it('GroupSync rejects the callers of a failed fdatasync', async () => {
    const gs = new GroupSync(async () => { throw new Error('EIO'); }, () => 1);
    let caught: Error | null = null;
    await gs.sync().catch((e: Error) => { caught = e; });
    expect(caught).to.be.an('error').with.property('message', 'EIO');
    await gs.idle();
  });
});
