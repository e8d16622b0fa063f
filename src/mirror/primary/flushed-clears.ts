// Dirty-bitmap bits go only once the peer holds the region's writes durably. The peer answers a
// write once it is in its page cache; a secondary that loses power loses what it had not flushed,
// and the primary must then resend exactly those regions (it learns of the loss from the pairing
// answer, see LunMirror.peerLostWrites). So a region that became clean waits here, and its bit is
// cleared only after a peer FLUSH that started after it did.
import { RegionSet } from '../../persist/region-set.js';

export class FlushedClears {
  /** Regions gathered for the next round. */
  private gathering: RegionSet;
  /** Regions of the round whose peer FLUSH is under way. */
  private flushing: RegionSet;
  private running = false;

  constructor(readonly regions: number) {
    this.gathering = new RegionSet(regions);
    this.flushing = new RegionSet(regions);
  }

  /** Regions waiting for a peer FLUSH (this round's and the next's). */
  get waiting(): number {
    return this.gathering.size + this.flushing.size;
  }

  /** Take the waiting regions out of `set`: the peer has their data (they only wait for its FLUSH). */
  subtractFrom(set: RegionSet): void {
    set.deleteSet(this.gathering);
    set.deleteSet(this.flushing);
  }

  /** Forget every waiting region (their bits stay set): the peer lost what it had not flushed. */
  forget(): void {
    this.gathering.clear();
    this.flushing.clear();
  }

  add(r: number): void {
    this.gathering.add(r);
  }

  addRange(first: number, n: number): void {
    this.gathering.addRange(first, n);
  }

  /**
   * One round: `flush` the peer (true: done); then `clear` each run of the regions gathered before
   * it started (the callee re-checks that each may still go). A failed flush keeps them for the next
   * round. At most one round runs at a time.
   */
  async round(flush: () => Promise<boolean>, clear: (first: number, n: number) => void): Promise<void> {
    if (this.running || this.gathering.size === 0) return;
    this.running = true;
    [this.gathering, this.flushing] = [this.flushing, this.gathering];
    const batch = this.flushing;
    try {
      // (A forget() meanwhile emptied the batch too: nothing of it is cleared or kept.)
      const ok = await flush().catch(() => false);
      if (!ok) {
        this.gathering.addSet(batch);
        return;
      }
      for (let r = batch.next(0); r >= 0;) {
        const end = batch.nextAbsent(r);
        const stop = end < 0 ? this.regions : end;
        clear(r, stop - r);
        r = stop < this.regions ? batch.next(stop) : -1;
      }
    } finally {
      batch.clear();
      this.running = false;
    }
  }
}
