// FlushedClears: a clean region's bit goes only after a peer FLUSH that started after it was
// gathered; a failed flush keeps it; forget() drops what waits. And the RegionSet steps it uses.
import { expect } from 'chai';
import { RegionSet } from '../../../src/persist/region-set.js';
import { FlushedClears } from '../../../src/mirror/primary/flushed-clears.js';

function members(s: RegionSet): number[] {
  const out: number[] = [];
  for (let r = s.next(0); r >= 0; r = s.next(r + 1)) out.push(r);
  return out;
}

describe('RegionSet range and set steps', function () {
  it('addRange adds [first, first+n) across byte boundaries and counts each member once', function () {
    const s = new RegionSet(40);
    s.add(3);
    s.addRange(2, 20);
    expect(s.size).to.equal(20);
    expect(members(s)).to.deep.equal(Array.from({ length: 20 }, (_, i) => i + 2));
    s.addRange(39, 1);
    expect(s.has(39)).to.equal(true);
    expect(() => s.addRange(35, 6)).to.throw(RangeError);
  });

  it('addSet is a union, deleteSet a difference', function () {
    const a = new RegionSet(30);
    const b = new RegionSet(30);
    a.addRange(0, 10);
    b.addRange(5, 20);
    a.addSet(b);
    expect(a.size).to.equal(25);
    const c = new RegionSet(30);
    c.addRange(8, 4);
    c.add(29);
    a.deleteSet(c);
    expect(a.size).to.equal(21);
    expect(members(a).filter((r) => r >= 8 && r < 12)).to.deep.equal([]);
  });
});

describe('FlushedClears', function () {
  it('clears each run of the gathered regions only after the flush succeeded', async function () {
    const fc = new FlushedClears(64);
    fc.addRange(4, 3);
    fc.add(10);
    const cleared: [number, number][] = [];
    let flushed = false;
    await fc.round(async () => { flushed = true; return true; }, (first, n) => { expect(flushed, 'cleared before the flush').to.equal(true); cleared.push([first, n]); });
    expect(cleared).to.deep.equal([[4, 3], [10, 1]]);
    expect(fc.waiting).to.equal(0);
  });

  it('a failed flush keeps the regions for the next round; regions gathered during a flush wait for the next one', async function () {
    const fc = new FlushedClears(64);
    fc.add(1);
    const cleared: number[] = [];
    await fc.round(async () => false, (first) => cleared.push(first));
    expect(cleared).to.deep.equal([]);
    expect(fc.waiting).to.equal(1);
    let release!: (ok: boolean) => void;
    const round = fc.round(() => new Promise<boolean>((r) => { release = r; }), (first) => cleared.push(first));
    fc.add(2);   // after the flush started: not covered by it
    await fc.round(async () => true, (first) => cleared.push(first));   // one round at a time: a no-op
    release(true);
    await round;
    expect(cleared).to.deep.equal([1]);
    await fc.round(async () => true, (first) => cleared.push(first));
    expect(cleared).to.deep.equal([1, 2]);
  });

  it('forget() during a flush: nothing of that round is cleared; subtractFrom() takes waiting regions out of a set', async function () {
    const fc = new FlushedClears(64);
    fc.addRange(0, 8);
    const set = new RegionSet(64);
    set.addRange(0, 16);
    fc.subtractFrom(set);
    expect(members(set)).to.deep.equal(Array.from({ length: 8 }, (_, i) => i + 8));
    const cleared: number[] = [];
    await fc.round(async () => { fc.forget(); return true; }, (first) => cleared.push(first));
    expect(cleared).to.deep.equal([]);
    expect(fc.waiting).to.equal(0);
  });
});
