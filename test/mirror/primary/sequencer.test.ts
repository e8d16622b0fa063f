// Sequencer: answers in any order advance the acked prefix only over a gapless run; a flush
// waiting on the prefix resolves exactly when the prefix reaches its target; the async window
// admits while there is room and lets waiters in as bytes are released; outages and drops.
import { expect } from 'chai';
import { Sequencer } from '../../../src/mirror/primary/sequencer.js';

interface Op { seq: number }

/** True if `p` has settled by the time the microtasks queued so far have run. */
async function settled(p: Promise<unknown> | null | void): Promise<boolean> {
  if (!p) return true;
  let done = false;
  void p.then(() => { done = true; });
  await new Promise((r) => setImmediate(r));
  return done;
}

function issue(s: Sequencer<Op>, n: number): Op[] {
  return Array.from({ length: n }, () => {
    const op = { seq: s.take() };
    s.track(op, 100);
    return op;
  });
}

describe('Sequencer', function () {
  it('answers out of order: the acked prefix advances only over a gapless run', function () {
    const s = new Sequencer<Op>(1 << 20);
    issue(s, 5);
    expect(s.inflight).to.equal(5);
    s.answer(3);
    s.answer(2);
    expect(s.ackedPrefix, 'seq 1 still unanswered').to.equal(0);
    s.answer(1);
    expect(s.ackedPrefix).to.equal(3);
    s.answer(5);
    expect(s.ackedPrefix).to.equal(3);
    expect(s.inflight).to.equal(2);
    s.answer(4);
    expect(s.ackedPrefix).to.equal(5);
    expect(s.inflight).to.equal(0);
  });

  it('a flush waiting on the acked prefix resolves exactly when it reaches the target', async function () {
    const s = new Sequencer<Op>(1 << 20);
    issue(s, 4);
    const flush = s.ackedTo(s.issued);   // target 4
    expect(flush).to.not.equal(null);
    s.answer(2);
    s.answer(4);
    s.answer(1);
    expect(s.ackedPrefix).to.equal(2);
    expect(await settled(flush), 'prefix 2 < target 4').to.equal(false);
    issue(s, 1);   // seq 5, issued after the flush: not waited for
    s.answer(3);
    expect(s.ackedPrefix).to.equal(4);
    expect(await settled(flush), 'prefix reached 4').to.equal(true);
    expect(s.ackedTo(4), 'already reached: nothing to wait for').to.equal(null);
  });

  it('takeTracked hands over the unanswered requests in sequence order, abandon releases flushes', async function () {
    const s = new Sequencer<Op>(1 << 20);
    issue(s, 6);
    s.answer(1);
    s.answer(4);
    const flush = s.ackedTo(6);
    // Kept: everything above the prefix, answered (4) or not, so a replay re-sends a dense run.
    expect(s.takeTracked().map((o) => o.seq)).to.deep.equal([2, 3, 4, 5, 6]);
    expect(s.takeTracked()).to.deep.equal([]);
    s.abandon();
    expect(await settled(flush)).to.equal(true);
    s.answer(2);
    expect(s.ackedPrefix, 'the answer to 4 was forgotten').to.equal(2);
  });

  it('resumeAfter counts what the peer applied as answered; skipAll makes nothing outstanding', async function () {
    const s = new Sequencer<Op>(1 << 20);
    issue(s, 6);
    s.answer(5);
    s.resumeAfter(4);
    expect(s.ackedPrefix, 'applied up to 4, and 5 was answered').to.equal(5);
    expect(s.takeTracked().map((o) => o.seq)).to.deep.equal([6]);
    s.resumeAfter(99);   // beyond what was issued: ignored
    expect(s.ackedPrefix).to.equal(5);
    const flush = s.ackedTo(6);
    s.skipAll();
    expect([s.ackedPrefix, s.inflight]).to.deep.equal([6, 0]);
    expect(await settled(flush)).to.equal(true);
  });

  it('restore continues numbering after the journal and depends on its last record', function () {
    const s = new Sequencer<Op>(1 << 20);
    s.restore(41, 30);
    expect([s.take(), s.doneHigh, s.ackedPrefix, s.inflight]).to.deep.equal([42, 41, 30, 12]);
    s.localDone(40);
    expect(s.doneHigh, 'doneHigh never goes back').to.equal(41);
    s.localDone(42);
    expect(s.doneHigh).to.equal(42);
  });

  it('window admission: room admits at once, a full window waits until released bytes make room', async function () {
    const s = new Sequencer<Op>(1000);
    expect(s.admit(5000), 'an empty window admits any size').to.equal(undefined);
    s.track({ seq: s.take() }, 600);
    expect(s.admit(400)).to.equal(undefined);
    s.track({ seq: s.take() }, 400);
    const first = s.admit(1);
    const second = s.admit(1);
    expect(first).to.be.instanceOf(Promise);
    s.admitWaiting();
    expect(await settled(first), 'still full').to.equal(false);
    s.release(400);   // 600 in flight: below the window
    expect(await settled(first), 'released, but not yet let in').to.equal(false);
    s.admitWaiting();
    expect(await settled(first)).to.equal(true);
    expect(await settled(second)).to.equal(true);
    expect(s.inflightBytes).to.equal(600);
  });
});
