// The activity log of one mirrored LUN over its persistent region bitmap: which regions have
// live requests in flight, which must be resent (resyncNeeded) or compared first (compareNeeded),
// which became clean and wait to have their bits cleared, and the ranges a compare is hashing.
//
// A bit may go once nothing is in flight there, nothing is stale there, and the journal is empty
// (`journalIdle`); it goes only after the region stayed quiet for a while and then a peer FLUSH
// covered its writes (flushed-clears.ts). Hot regions stay marked (as DRBD's activity log keeps
// hot extents): marking a clean region costs a bitmap write before the data write.
import type { RegionBitmap } from '../../persist/bitmap.js';
import { RegionSet } from '../../persist/region-set.js';
import { CompareWatch } from './catch-up-walk.js';
import { FlushedClears } from './flushed-clears.js';

export class DirtyRegions {
  /** Regions whose copy on the peer is stale and must be resent from local data. */
  readonly resyncNeeded: RegionSet;
  /** Regions to compare with the peer's copy (by hash) before deciding to send them. */
  readonly compareNeeded: RegionSet;
  /** Ranges being compared; a write into one meanwhile voids its verdict. */
  readonly watching = new CompareWatch();
  /** Clean regions waiting for a peer FLUSH before their bits go: quiet ones, and ones the compare found equal. */
  readonly clears: FlushedClears;
  readonly compareClears: FlushedClears;
  /** Live requests in flight per region (their bits must stay set). */
  private readonly pending = new Map<number, number>();
  /** Regions that became clearable, and when. */
  private readonly clearCandidates = new Map<number, number>();

  constructor(readonly bitmap: RegionBitmap, private readonly journalIdle: () => boolean) {
    this.resyncNeeded = new RegionSet(bitmap.regions);
    this.compareNeeded = new RegionSet(bitmap.regions);
    this.clears = new FlushedClears(bitmap.regions);
    this.compareClears = new FlushedClears(bitmap.regions);
  }

  /** A request over regions [first, last] is in flight: their bits stay. */
  opStarted(first: number, last: number): void {
    for (let r = first; r <= last; r++) {
      this.pending.set(r, (this.pending.get(r) ?? 0) + 1);
      this.clearCandidates.delete(r);
    }
  }

  /** A request over regions [first, last] was answered (or failed). */
  opEnded(first: number, last: number): void {
    for (let r = first; r <= last; r++) {
      const n = (this.pending.get(r) ?? 1) - 1;
      if (n > 0) this.pending.set(r, n);
      else {
        this.pending.delete(r);
        this.maybeClear(r);
      }
    }
  }

  needResync(offset: number, length: number): void {
    const [first, last] = this.bitmap.regionsOf(offset, length);
    for (let r = first; r <= last; r++) this.resyncNeeded.add(r);
  }

  /** Host write path: a write into a range under comparison voids its verdict. */
  noteTouched(pos: number, len: number): void {
    const [first, last] = this.bitmap.regionsOf(pos, len);
    this.watching.touch(first, last);
  }

  /** Every marked region is to be sent again: compared first while a full sync is under way. */
  markedAreStale(compare: boolean): void {
    this.bitmap.addSetTo(compare ? this.compareNeeded : this.resyncNeeded);
  }

  /** Regions waiting for a peer FLUSH to be cleared were clean on a copy that is gone: they stay marked. */
  forgetClears(): void {
    this.clears.forget();
    this.compareClears.forget();
  }

  private maybeClear(r: number): void {
    if (this.clearable(r)) this.clearCandidates.set(r, Date.now());
  }

  clearable(r: number): boolean {
    return !this.pending.has(r) && !this.resyncNeeded.has(r) && !this.compareNeeded.has(r) && this.journalIdle();
  }

  /**
   * maybeClear() every set region not still to compare or resend, walking the bits: a full sync
   * of a large LUN has millions set, all of them in compareNeeded.
   */
  clearQuiet(): void {
    const bitmap = this.bitmap;
    const skip = (r: number, set: RegionSet) => (set.has(r) ? set.nextAbsent(r) : r);
    for (let r = bitmap.nextSet(0); r >= 0;) {
      const next = skip(skip(r, this.compareNeeded), this.resyncNeeded);
      if (next < 0) return;
      if (next !== r) {
        r = bitmap.nextSet(next);
        continue;
      }
      this.maybeClear(r);
      r = bitmap.nextSet(r + 1);
    }
  }

  /** clearable() for every region of [first, first+n), without a lookup per region where it can. */
  private clearableRange(first: number, n: number): boolean {
    if (!this.journalIdle()) return false;
    if (this.resyncNeeded.countRange(first, n) !== 0 || this.compareNeeded.countRange(first, n) !== 0) return false;
    if (this.pending.size < n) {
      for (const r of this.pending.keys()) if (r >= first && r < first + n) return false;
      return true;
    }
    for (let r = first; r < first + n; r++) if (this.pending.has(r)) return false;
    return true;
  }

  /** Clear the bits of clean regions: in one bulk step when none of them has anything behind it. */
  clearClean(first: number, n: number): void {
    const bitmap = this.bitmap;
    if (n > 1 && this.clearableRange(first, n)) return bitmap.clearRegions(first, n);
    for (let r = first; r < first + n; r++) if (this.clearable(r)) bitmap.clear(r);
  }

  /** Candidates quiet since before `before` (ms) go to wait for the next peer FLUSH. */
  gatherQuiet(before: number): void {
    for (const [r, at] of this.clearCandidates) {
      if (at > before) continue;
      this.clearCandidates.delete(r);
      this.clears.add(r);
    }
  }

  /** A round per set with regions waiting: their bits go after `flush` succeeds (flushed-clears.ts). Resolves when both are done. */
  clearRounds(flush: () => Promise<boolean>, failed: (err: Error) => void): Promise<unknown> {
    const rounds: Promise<void>[] = [];
    for (const set of [this.clears, this.compareClears]) {
      if (set.waiting === 0) continue;
      rounds.push(set.round(flush, (first, n) => this.clearClean(first, n)).catch(failed));
    }
    return Promise.all(rounds);
  }
}
