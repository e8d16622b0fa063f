// OverlapGate: overlapping writes of a mirrored LUN enter one after the other, in arrival order;
// non-overlapping ones run in parallel.
import { expect } from 'chai';
import { OverlapGate, type GateToken } from '../../../src/mirror/primary/overlap-gate.js';

/** Let every pending promise callback run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Wrap a pending enter() so the test can see whether (and in which order) it entered. */
function track(p: GateToken | Promise<GateToken>, name: string, order: string[]) {
  expect(p, `${name} should have to wait`).to.be.instanceOf(Promise);
  const t: { token: GateToken | null } = { token: null };
  void (p as Promise<GateToken>).then((token) => {
    t.token = token;
    order.push(name);
  });
  return t;
}

function immediate(p: GateToken | Promise<GateToken>, name: string): GateToken {
  expect(p, `${name} should enter at once`).to.not.be.instanceOf(Promise);
  return p as GateToken;
}

describe('OverlapGate', function () {
  it('non-overlapping ranges enter immediately (synchronously), adjacent ones included', function () {
    const g = new OverlapGate();
    const a = immediate(g.enter(0, 10), 'a');
    const b = immediate(g.enter(10, 10), 'b');      // [10,20) touches [0,10) without overlapping
    const c = immediate(g.enter(100, 1), 'c');
    expect(a).to.deep.equal({ start: 0, end: 10 });
    expect(b).to.deep.equal({ start: 10, end: 20 });
    expect(c).to.deep.equal({ start: 100, end: 101 });
    expect(g.size).to.equal(3);
    g.leave(a);
    g.leave(b);
    g.leave(c);
    expect(g.size).to.equal(0);
  });

  it('an overlapping range waits until the active one leaves', async function () {
    const g = new OverlapGate();
    const order: string[] = [];
    const a = immediate(g.enter(0, 10), 'a');
    const b = track(g.enter(9, 5), 'b', order);     // overlaps a by one byte
    await settle();
    expect(b.token).to.equal(null);
    expect(g.size).to.equal(2);
    g.leave(a);
    await settle();
    expect(order).to.deep.equal(['b']);
    expect(b.token).to.include({ start: 9, end: 14 });
    g.leave(b.token!);
    expect(g.size).to.equal(0);
  });

  it('a range contained in, or containing, an active one waits', async function () {
    const g = new OverlapGate();
    const order: string[] = [];
    const a = immediate(g.enter(100, 100), 'a');
    track(g.enter(150, 1), 'inner', order);
    const g2 = new OverlapGate();
    const small = immediate(g2.enter(150, 1), 'small');
    track(g2.enter(0, 1000), 'outer', order);
    await settle();
    expect(order).to.deep.equal([]);
    g.leave(a);
    g2.leave(small);
    await settle();
    expect(order).to.deep.equal(['inner', 'outer']);
  });

  it('overlapping waiters enter in FIFO order, one at a time', async function () {
    const g = new OverlapGate();
    const order: string[] = [];
    const a = immediate(g.enter(0, 100), 'a');
    const w1 = track(g.enter(0, 100), 'w1', order);
    const w2 = track(g.enter(50, 100), 'w2', order);
    const w3 = track(g.enter(90, 20), 'w3', order);      // overlaps w1 and w2
    await settle();
    expect(order).to.deep.equal([]);

    g.leave(a);
    await settle();
    expect(order).to.deep.equal(['w1']);
    g.leave(w1.token!);
    await settle();
    expect(order).to.deep.equal(['w1', 'w2']);
    g.leave(w2.token!);
    await settle();
    expect(order).to.deep.equal(['w1', 'w2', 'w3']);
    g.leave(w3.token!);
    expect(g.size).to.equal(0);
  });

  it('a range that overlaps no active one but an earlier waiter waits behind that waiter', async function () {
    const g = new OverlapGate();
    const order: string[] = [];
    const a = immediate(g.enter(0, 10), 'a');             // [0,10)
    const w1 = track(g.enter(5, 10), 'w1', order);         // [5,15): waits for a
    const w2 = track(g.enter(12, 5), 'w2', order);         // [12,17): free of a, but overlaps w1
    const free = immediate(g.enter(20, 5), 'free');        // [20,25): overlaps nothing at all
    await settle();
    expect(order).to.deep.equal([]);

    g.leave(a);
    await settle();
    expect(order, 'w2 must not overtake w1').to.deep.equal(['w1']);
    g.leave(w1.token!);
    await settle();
    expect(order).to.deep.equal(['w1', 'w2']);
    g.leave(w2.token!);
    g.leave(free);
    expect(g.size).to.equal(0);
  });

  it('one leave() can admit several non-overlapping waiters, skipping a blocked one', async function () {
    const g = new OverlapGate();
    const order: string[] = [];
    const a = immediate(g.enter(0, 100), 'a');             // [0,100)
    const b = immediate(g.enter(200, 10), 'b');            // [200,210)
    const w1 = track(g.enter(0, 10), 'w1', order);         // waits for a
    const w2 = track(g.enter(205, 10), 'w2', order);       // waits for b
    const w3 = track(g.enter(90, 20), 'w3', order);        // waits for a
    await settle();
    g.leave(a);
    await settle();
    expect(order).to.deep.equal(['w1', 'w3']);
    expect(w2.token).to.equal(null);
    g.leave(b);
    await settle();
    expect(order).to.deep.equal(['w1', 'w3', 'w2']);
    for (const t of [w1, w2, w3]) g.leave(t.token!);
    expect(g.size).to.equal(0);
  });
});
