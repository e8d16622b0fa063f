// Pieces of the catch-up workers (initial sync / full compare, resync) that keep them cheap on a
// LUN of millions of regions: an ordered walk over the regions still to compare that hands out
// large ranges first, the ranges under comparison that host writes void, and a turn budget so a
// long loop never holds the event loop (heartbeats, hosts, the systemd watchdog) for long.
import { performance } from 'node:perf_hooks';
import { setImmediate as yieldTurn } from 'node:timers/promises';
import type { RegionSet } from '../../persist/region-set.js';

/** Regions [first, first+n) to compare as one range (one hash on each side). */
export interface CompareItem {
  first: number;
  n: number;
}

export interface CompareWalkShape {
  /** Regions of the LUN. */
  regions: number;
  /** A range of this many regions that is a hole here is compared as one (few distinct lengths: each has its zero digest cached). */
  holeRegions: number;
  /** Any other range of this many regions, all still to compare, is compared as one. */
  dataRegions: number;
  /** A range that differed is compared next in runs of up to this many regions (1: one by one). */
  fineRegions: number;
  /** True if regions [first, first+n) are all hole in the local copy. */
  isHole(first: number, n: number): boolean;
}

/**
 * Hands out what is left in `todo` in ascending order: an aligned block that is all still to
 * compare as one item (a hole block of holeRegions, else dataRegions), else single regions. An
 * item whose hashes differ is descended into: its regions come next, in runs of up to
 * fineRegions still to compare (the comparison resends a run that differs whole). The walk does
 * not remove regions from `todo`; the comparison does, once it has a verdict.
 */
export class CompareWalk {
  private cursor = 0;
  private readonly fine: { at: number; end: number }[] = [];

  constructor(private readonly todo: RegionSet, private readonly shape: CompareWalkShape) {}

  get fineRegions(): number {
    return this.shape.fineRegions;
  }

  /** The next item to compare, or null if nothing is left to start (items in flight may still descend). */
  next(): CompareItem | null {
    while (this.fine.length > 0) {
      const f = this.fine[0];
      const r = this.todo.next(f.at, f.end);
      if (r < 0) {
        this.fine.shift();
        continue;
      }
      let n = 1;
      while (n < this.shape.fineRegions && r + n < f.end && this.todo.has(r + n)) n++;
      f.at = r + n;
      return { first: r, n };
    }
    const r = this.todo.next(this.cursor);
    if (r < 0) return null;
    const item = this.sized(r);
    this.cursor = r + item.n;
    return item;
  }

  /** An item differed (or a host wrote it meanwhile): its regions are compared in fine runs. */
  descend(item: CompareItem): void {
    this.fine.push({ at: item.first, end: item.first + item.n });
  }

  private sized(r: number): CompareItem {
    const { regions, holeRegions, dataRegions } = this.shape;
    const left = regions - r;
    if (holeRegions > 1 && r % holeRegions === 0) {
      const n = Math.min(holeRegions, left);
      if (this.todo.countRange(r, n) === n && this.shape.isHole(r, n)) return { first: r, n };
    }
    if (dataRegions > 1 && r % dataRegions === 0) {
      const n = Math.min(dataRegions, left);
      if (this.todo.countRange(r, n) === n) return { first: r, n };
    }
    return { first: r, n: 1 };
  }
}

/** A range being compared; a host write into it meanwhile voids its verdict. */
export interface Watched {
  first: number;
  end: number;
  touched: boolean;
}

/** The ranges under comparison (a few dozen at most: one per comparison in flight). */
export class CompareWatch {
  private readonly items: Watched[] = [];

  get size(): number {
    return this.items.length;
  }

  watch(first: number, n: number): Watched {
    const w = { first, end: first + n, touched: false };
    this.items.push(w);
    return w;
  }

  unwatch(w: Watched): void {
    const i = this.items.indexOf(w);
    if (i >= 0) this.items.splice(i, 1);
  }

  /** Host write path: regions [first, last] were written. */
  touch(first: number, last: number): void {
    if (last < first) return;
    for (let i = 0; i < this.items.length; i++) {
      const w = this.items[i];
      if (first < w.end && last >= w.first) w.touched = true;
    }
  }
}

/**
 * A loop over many regions calls yield() each step: once the loop has run `budgetMs` since its
 * last real turn, it waits for the next one (setImmediate), so timers and sockets are served.
 * Awaiting a resolved promise does not do that: microtasks run before any I/O.
 */
export class TurnBudget {
  private since = performance.now();

  constructor(private readonly budgetMs = 10) {}

  yield(): Promise<void> | void {
    if (performance.now() - this.since < this.budgetMs) return;
    return yieldTurn().then(() => { this.since = performance.now(); });
  }
}
