// DirtyRegions: a request's region span holds every region it touches; a region's bit may go
// only with nothing in flight there, nothing stale there and the journal idle, and it goes only
// after a peer FLUSH that started after the region became clean (and it is re-checked then).
import { expect } from 'chai';
import { DirtyRegions } from '../../../src/mirror/primary/dirty-regions.js';
import { RegionBitmap } from '../../../src/persist/bitmap.js';
import { tmpDir, type TmpDir } from '../../helpers/tmp.js';

const RS = 64 * 1024;
const ok = () => Promise.resolve(true);
const noFailure = (err: Error) => { throw err; };

describe('DirtyRegions', function () {
  let dir: TmpDir;
  let bitmap: RegionBitmap;
  let journalIdle: boolean;
  let dirty: DirtyRegions;

  beforeEach(async () => {
    dir = await tmpDir('nbd-dirty-regions-test-');
    bitmap = await RegionBitmap.open(dir.join('lun.bitmap'), 16 * RS, RS);
    journalIdle = true;
    dirty = new DirtyRegions(bitmap, () => journalIdle);
  });

  afterEach(async () => {
    await bitmap.close().catch(() => undefined);
    await dir.cleanup();
  });

  /** A live request over [offset, offset+length): marked, then in flight. */
  async function start(offset: number, length: number): Promise<[number, number]> {
    const m = bitmap.mark(offset, length);
    if (m) await m;
    const span = bitmap.regionsOf(offset, length);
    dirty.opStarted(...span);
    return span;
  }

  it('a request across a region boundary holds both regions until it ends', async function () {
    const span = await start(RS - 512, 1024);
    expect(span).to.deep.equal([0, 1]);
    const other = await start(RS + 4096, 512);   // a second request on region 1
    expect([dirty.clearable(0), dirty.clearable(1)]).to.deep.equal([false, false]);
    dirty.opEnded(...span);
    expect([dirty.clearable(0), dirty.clearable(1)], 'region 1 still has a request in flight').to.deep.equal([true, false]);
    dirty.opEnded(...other);
    expect(dirty.clearable(1)).to.equal(true);
  });

  it('stale, still-to-compare and journaled regions are not clearable', async function () {
    dirty.opEnded(...(await start(0, 3 * RS)));
    dirty.needResync(RS + 10, 1);
    dirty.compareNeeded.add(2);
    expect([0, 1, 2].map((r) => dirty.clearable(r))).to.deep.equal([true, false, false]);
    journalIdle = false;
    expect(dirty.clearable(0), 'the journal still holds records').to.equal(false);
  });

  it('a clean region\'s bit goes only after the peer FLUSH that followed it', async function () {
    dirty.opEnded(...(await start(0, RS)));
    dirty.gatherQuiet(Date.now() + 1);
    expect(dirty.clears.waiting).to.equal(1);
    let flushed!: (ok: boolean) => void;
    const round = dirty.clearRounds(() => new Promise<boolean>((r) => { flushed = r; }), noFailure);
    await new Promise((r) => setImmediate(r));
    expect(bitmap.isSet(0), 'the FLUSH has not completed').to.equal(true);
    flushed(true);
    await round;
    expect(bitmap.isSet(0)).to.equal(false);
    expect(dirty.clears.waiting).to.equal(0);
  });

  it('a failed FLUSH keeps the bit for the next round; a write meanwhile keeps it for good', async function () {
    dirty.opEnded(...(await start(0, 2 * RS)));
    dirty.gatherQuiet(Date.now() + 1);
    await dirty.clearRounds(() => Promise.resolve(false), noFailure);
    expect([bitmap.isSet(0), bitmap.isSet(1), dirty.clears.waiting]).to.deep.equal([true, true, 2]);
    // Region 1 is written again while the next round's FLUSH is under way: re-checked, it stays.
    let flushed!: (ok: boolean) => void;
    const round = dirty.clearRounds(() => new Promise<boolean>((r) => { flushed = r; }), noFailure);
    await start(RS, 512);
    flushed(true);
    await round;
    expect([bitmap.isSet(0), bitmap.isSet(1)]).to.deep.equal([false, true]);
  });

  it('only regions quiet since before the cut-off are gathered', async function () {
    dirty.opEnded(...(await start(0, RS)));
    dirty.gatherQuiet(Date.now() - 60_000);
    expect(dirty.clears.waiting, 'clean for less than the delay').to.equal(0);
    await dirty.clearRounds(ok, noFailure);
    expect(bitmap.isSet(0)).to.equal(true);
    dirty.gatherQuiet(Date.now() + 1);
    await dirty.clearRounds(ok, noFailure);
    expect(bitmap.isSet(0)).to.equal(false);
  });

  it('clearQuiet makes every marked region clearable except those still to compare or resend', async function () {
    await bitmap.markRegions(0, 8);
    dirty.compareNeeded.addRange(2, 3);
    dirty.resyncNeeded.add(6);
    dirty.clearQuiet();
    dirty.gatherQuiet(Date.now() + 1);
    await dirty.clearRounds(ok, noFailure);
    expect(bitmap.setRegions()).to.deep.equal([2, 3, 4, 6]);
  });

  it('forgetClears drops what waits for a FLUSH: the bits stay', async function () {
    dirty.opEnded(...(await start(0, RS)));
    dirty.gatherQuiet(Date.now() + 1);
    dirty.compareClears.add(5);
    dirty.forgetClears();
    expect([dirty.clears.waiting, dirty.compareClears.waiting]).to.deep.equal([0, 0]);
    await dirty.clearRounds(ok, noFailure);
    expect(bitmap.isSet(0)).to.equal(true);
  });
});
