// ApplyOrder: the secondary applies a request only once every request up to its dep is
// applied, acknowledges duplicates without applying them, and follows primary restarts.
import { expect } from 'chai';
import { ApplyOrder } from '../../../src/mirror/secondary/apply-order.js';

const RUN1 = Buffer.from('run-0001');
const RUN2 = Buffer.from('run-0002');

function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Track whether ready(dep) has resolved. */
function ready(o: ApplyOrder, dep: number): { done: boolean; immediate: boolean } {
  const r = { done: false, immediate: false };
  const p = o.ready(dep);
  if (p === null) {
    r.done = true;
    r.immediate = true;
  } else {
    void p.then(() => { r.done = true; });
  }
  return r;
}

describe('ApplyOrder', function () {
  it('ready(dep) is null at once when every request up to dep is applied', function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    expect(o.appliedPrefix).to.equal(0);
    expect(o.ready(0)).to.equal(null);
    o.applied(1);
    expect(o.ready(1)).to.equal(null);
    expect(o.ready(0)).to.equal(null);
  });

  it('ready(dep) waits until all requests <= dep are applied, not just dep itself', async function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    const r3 = ready(o, 3);
    const r1 = ready(o, 1);
    expect(r3.immediate).to.equal(false);
    expect(o.waiting).to.equal(2);

    o.applied(3);
    o.applied(2);
    await settle();
    expect(r3.done, 'seq 1 is still missing').to.equal(false);
    expect(r1.done).to.equal(false);
    expect(o.appliedPrefix).to.equal(0);

    o.applied(1);
    await settle();
    expect(o.appliedPrefix).to.equal(3);
    expect(r1.done).to.equal(true);
    expect(r3.done).to.equal(true);
    expect(o.waiting).to.equal(0);
  });

  it('out-of-order applied() advances the prefix over every contiguous run', function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    for (const s of [5, 3, 2, 7]) o.applied(s);
    expect(o.appliedPrefix).to.equal(0);
    o.applied(1);
    expect(o.appliedPrefix).to.equal(3);
    o.applied(4);
    expect(o.appliedPrefix).to.equal(5);
    o.applied(6);
    expect(o.appliedPrefix).to.equal(7);
    o.applied(2);                     // duplicate below the prefix: no effect
    expect(o.appliedPrefix).to.equal(7);
  });

  it('isApplied() is true for the prefix and for seqs applied beyond it, false for gaps', function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    o.applied(1);
    o.applied(4);
    expect(o.isApplied(1)).to.equal(true);
    expect(o.isApplied(2)).to.equal(false);
    expect(o.isApplied(3)).to.equal(false);
    expect(o.isApplied(4)).to.equal(true);
    expect(o.isApplied(5)).to.equal(false);
    o.applied(2);
    o.applied(3);
    expect(o.appliedPrefix).to.equal(4);
    for (const s of [1, 2, 3, 4]) expect(o.isApplied(s), `seq ${s}`).to.equal(true);
  });

  it('resume() with a new instance starts over at its nextSeq', function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    for (const s of [1, 2, 3, 6]) o.applied(s);
    expect(o.appliedPrefix).to.equal(3);

    o.resume(RUN2, 1);
    expect(o.instance!.equals(RUN2)).to.equal(true);
    expect(o.appliedPrefix).to.equal(0);
    expect(o.isApplied(1), 'old run numbers do not count for the new run').to.equal(false);
    expect(o.isApplied(6)).to.equal(false);
    expect(o.ready(1)).to.not.equal(null);

    const o2 = new ApplyOrder();
    o2.resume(RUN1, 1);
    o2.applied(1);
    o2.resume(RUN2, 50);              // a new run that starts numbering at 50
    expect(o2.appliedPrefix).to.equal(49);
    expect(o2.ready(49)).to.equal(null);
  });

  it('resume() keeps its own copy of the instance id', function () {
    const o = new ApplyOrder();
    const id = Buffer.from(RUN1);
    o.resume(id, 1);
    o.applied(1);
    id[0] ^= 0xff;                    // the caller reuses its buffer
    o.resume(RUN1, 1);
    expect(o.appliedPrefix, 'same run: nothing reset').to.equal(1);
  });

  it('resume() with the same instance skips ahead, folds in seqs above, and releases waiters', async function () {
    const o = new ApplyOrder();
    o.resume(RUN1, 1);
    o.applied(1);
    o.applied(11);                    // applied beyond the gap 2..10
    o.applied(12);
    const r10 = ready(o, 10);
    const r12 = ready(o, 12);
    const r13 = ready(o, 13);

    o.resume(RUN1, 11);               // the primary says everything below 11 was answered
    await settle();
    expect(o.appliedPrefix).to.equal(12);
    expect(o.isApplied(12)).to.equal(true);
    expect(o.isApplied(7)).to.equal(true);
    expect(r10.done).to.equal(true);
    expect(r12.done).to.equal(true);
    expect(r13.done).to.equal(false);
    expect(o.waiting).to.equal(1);

    o.resume(RUN1, 5);                // never goes back
    expect(o.appliedPrefix).to.equal(12);
    o.applied(13);
    await settle();
    expect(r13.done).to.equal(true);
  });
});
