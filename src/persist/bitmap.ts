// The persistent dirty-region bitmap of one LUN (format: docs/journal-format.md).
//
// One bit per region of the LUN: set (and written to the file) before any mirrored change
// touches the region, cleared once the peer has everything for it. Writes are plain pwrites, so
// set bits survive a SIGKILL; sync() (host FLUSH) makes them survive a power loss too.
//
// File writes go through one writer: at most one write in flight; changed byte indexes queue up
// and each write carries the *current* in-memory value of its bytes (runs of nearby bytes
// coalesced). Two pwrites of the same byte are never in flight together, so an older value can
// never land after a newer one.
import fs from 'node:fs';
import { closeFd, fdatasync, openOrCreate, preadFull } from './file-io.js';
import { encodeHeader, readHeader } from './header.js';
import { BITMAP_HEADER, BITMAP_MAGIC, BITMAP_VERSION, bitmapHeader } from './record.js';
import { FailureLatch, GroupSync } from './serial-writer.js';
import { NbdMirrorError } from '../errors.js';
import { nextSetBit, popcount8, type RegionSet } from './region-set.js';

export class BitmapError extends NbdMirrorError { override readonly code = 'bitmap'; }

export const DEFAULT_REGION_SIZE = 64 * 1024;
/** Dirty bytes closer than this are written as one run (the bytes between are current anyway). */
const COALESCE_GAP = 64;

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

export class RegionBitmap {
  readonly regions: number;
  private setCount = 0;
  /** Byte indexes changed in memory since the last write started. */
  private dirty = new Set<number>();
  /**
   * Plus a span of bytes [dirtyLo, dirtyHi) changed by bulk operations (markRegions,
   * clearRegions): a catch-up over millions of regions would otherwise queue millions of indexes.
   */
  private dirtyLo = 0;
  private dirtyHi = 0;
  /** Byte indexes the write in flight carries (null: no write in flight). */
  private inflight: Set<number> | null = null;
  private inflightDone: Deferred | null = null;
  /** Waiters for the write that starts after the one in flight. */
  private next: Deferred | null = null;
  private writeGen = 0;
  private readonly syncer: GroupSync;
  /** Set by a failed fdatasync (a failed write only leaves its bytes dirty, to be written again). */
  private readonly latch = new FailureLatch();
  private closing: Promise<void> | null = null;

  private constructor(
    readonly path: string,
    readonly lunSize: number,
    readonly regionSize: number,
    private readonly fd: number,
    private readonly bits: Buffer,
  ) {
    this.regions = regionCount(lunSize, regionSize);
    for (let k = 0; k < bits.length; k++) this.setCount += popcount8(bits[k]);
    this.syncer = new GroupSync(async () => {
      try {
        await fdatasync(this.fd);
      } catch (err) {
        // The kernel may have dropped the dirty pages: what is on disk is no longer known.
        this.latch.latch(new Error(`fdatasync failed: ${(err as Error).message}`));
        throw this.failedError();
      }
    }, () => this.writeGen);
  }

  private get failure(): Error | null { return this.latch.failure; }

  /** Open (or create, all clear) the bitmap file of a LUN. A header for another geometry throws BitmapError. */
  static async open(path: string, lunSize: number, regionSize: number = DEFAULT_REGION_SIZE): Promise<RegionBitmap> {
    if (!Number.isSafeInteger(lunSize) || lunSize < 0) throw new BitmapError(`bitmap ${path}: invalid LUN size ${lunSize}`);
    if (!Number.isInteger(regionSize) || regionSize < 1 || regionSize > 0xffffffff) {
      throw new BitmapError(`bitmap ${path}: invalid region size ${regionSize}`);
    }
    const regions = regionCount(lunSize, regionSize);
    if (regions > 0xffffffff) throw new BitmapError(`bitmap ${path}: ${regions} regions is too many; use larger regions`);
    const nbytes = Math.ceil(regions / 8);
    const header = encodeBitmapHeader(lunSize, regionSize);

    const opened = await openOrCreate(path, Buffer.concat([header, Buffer.alloc(nbytes)]));
    const { fd, size } = opened;
    try {
      const bits = Buffer.alloc(nbytes);
      if (!opened.fresh) {
        await checkHeader(fd, path, size, lunSize, regionSize);
        const want = header.length + nbytes;
        if (size !== want) throw new BitmapError(`bitmap ${path}: file has ${size} bytes, ${want} expected for its geometry (damaged)`);
        if (await preadFull(fd, bits, 0, nbytes, header.length) !== nbytes) throw new BitmapError(`bitmap ${path}: short read`);
        if (regions % 8 !== 0) bits[nbytes - 1] &= (1 << (regions % 8)) - 1;   // bits past the last region mean nothing
      }
      return new RegionBitmap(path, lunSize, regionSize, fd, bits);
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Regions [first, last] that bytes [offset, offset+length) touch. An empty range touches none:
   * then last = first - 1.
   */
  regionsOf(offset: number, length: number): [first: number, last: number] {
    this.checkRange(offset, length);
    const first = Math.floor(offset / this.regionSize);
    return [first, length === 0 ? first - 1 : Math.floor((offset + length - 1) / this.regionSize)];
  }

  /**
   * Set the bit of every region the range touches. null if all were set and on the file already
   * (no allocation); else a promise that resolves once a write of their bytes that started after
   * the bits were set has completed.
   */
  mark(offset: number, length: number): Promise<void> | null {
    if (this.failure || this.closing) return Promise.reject(this.failure ? this.failedError() : this.closedError());
    this.checkRange(offset, length);
    if (length === 0) return null;
    const bits = this.bits;
    const first = Math.floor(offset / this.regionSize);
    const last = Math.floor((offset + length - 1) / this.regionSize);
    let needNext = false;
    let needInflight = false;
    for (let r = first; r <= last; r++) {
      const k = r >>> 3;
      const m = 1 << (r & 7);
      if ((bits[k] & m) === 0) {
        bits[k] |= m;
        this.setCount++;
        this.dirty.add(k);
        needNext = true;
      } else if (!needNext) {
        // Set in memory, but maybe not on the file yet.
        if (this.dirty.has(k) || (k >= this.dirtyLo && k < this.dirtyHi)) needNext = true;
        else if (this.inflight !== null && this.inflight.has(k)) needInflight = true;
      }
    }
    if (needNext) {
      // The writer is synchronous: the bytes are on the file when this returns.
      const p = this.waitNext();
      if (!this.hasDirty() && this.inflight === null && !this.failure) return null;
      return p;
    }
    if (needInflight) return this.inflightDone!.promise;
    return null;
  }

  /** Clear a region's bit in memory; the next flushDirty()/sync() (or any later write) persists it. */
  clear(region: number): void {
    if (this.closing) throw this.closedError();
    this.checkRegion(region);
    const k = region >>> 3;
    const m = 1 << (region & 7);
    if ((this.bits[k] & m) === 0) return;
    this.bits[k] &= ~m;
    this.setCount--;
    this.dirty.add(k);
  }

  isSet(region: number): boolean {
    this.checkRegion(region);
    return (this.bits[region >>> 3] & (1 << (region & 7))) !== 0;
  }

  /**
   * Set the bits of regions [first, first+n) in bulk (whole bytes at a time). Resolves once a
   * write of them that started after they were set has completed, like mark().
   */
  markRegions(first: number, n: number): Promise<void> {
    if (this.failure || this.closing) return Promise.reject(this.failure ? this.failedError() : this.closedError());
    this.bulk(first, n, true);
    return this.flushDirty();
  }

  /** Clear the bits of regions [first, first+n) in memory; persisted like clear(). */
  clearRegions(first: number, n: number): void {
    if (this.closing) throw this.closedError();
    this.bulk(first, n, false);
  }

  private bulk(first: number, n: number, set: boolean): void {
    if (n <= 0) return;
    this.checkRegion(first);
    this.checkRegion(first + n - 1);
    const end = first + n;
    this.setCount += fillBits(this.bits, first, end, set);
    this.bulkSpan(first >>> 3, ((end - 1) >>> 3) + 1);
  }

  private bulkSpan(lo: number, hi: number): void {
    if (this.dirtyLo >= this.dirtyHi) {
      this.dirtyLo = lo;
      this.dirtyHi = hi;
    } else {
      this.dirtyLo = Math.min(this.dirtyLo, lo);
      this.dirtyHi = Math.max(this.dirtyHi, hi);
    }
  }

  /** First set region at or after `from`, or -1: walks the bitmap without listing it. */
  nextSet(from: number): number {
    return nextSetBit(this.bits, from, this.regions);
  }

  /** Add every set region to `set`, except those in `except` (a word-wise copy, no list). */
  addSetTo(set: RegionSet, except?: RegionSet): void {
    set.addBits(this.bits, except);
  }

  /** Number of set bits. */
  get count(): number {
    return this.setCount;
  }

  /** Every set region, ascending (small bitmaps and tests: a large LUN walks with nextSet()). */
  setRegions(): number[] {
    const out: number[] = [];
    const bits = this.bits;
    for (let k = 0; k < bits.length; k++) {
      const b = bits[k];
      if (b === 0) continue;
      for (let i = 0; i < 8; i++) if (b & (1 << i)) out.push(k * 8 + i);
    }
    return out;
  }

  /** Write every in-memory change not yet on the file (set and cleared bits). */
  flushDirty(): Promise<void> {
    if (this.failure) return Promise.reject(this.failedError());
    if (this.hasDirty()) return this.waitNext();
    if (this.inflightDone) return this.inflightDone.promise;
    return Promise.resolve();
  }

  /** flushDirty(), then fdatasync (shared with concurrent callers). */
  async sync(): Promise<void> {
    if (this.closing) throw this.closedError();
    await this.flushDirty();
    await this.syncer.sync();
  }

  /** Persist every change, fdatasync, close. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      let err: unknown = null;
      if (!this.failure) await this.flushDirty().catch((e: unknown) => { err = e; });
      while (this.inflightDone) await this.inflightDone.promise.catch(() => undefined);
      await this.syncer.idle();
      if (!this.failure && !err) await fdatasync(this.fd).catch((e: unknown) => { err = e; });
      await closeFd(this.fd);
      if (err) throw err;
    })();
    return this.closing;
  }

  // ---- the writer ------------------------------------------------------------------------------

  private hasDirty(): boolean {
    return this.dirty.size > 0 || this.dirtyLo < this.dirtyHi;
  }

  private waitNext(): Promise<void> {
    const p = (this.next ??= deferred()).promise;
    this.kick();
    return p;
  }

  /** Start the next write if none is in flight and someone waits for one. */
  private kick(): void {
    if (this.inflight !== null || this.next === null) return;
    const done = this.next;
    this.next = null;
    if (!this.hasDirty()) return done.resolve();
    const carried = this.dirty;
    const [spanLo, spanHi] = [this.dirtyLo, this.dirtyHi];
    this.dirty = new Set();
    this.dirtyLo = this.dirtyHi = 0;
    this.inflight = carried;
    this.inflightDone = done;
    try {
      writeRuns(this.fd, this.bits, carried, spanLo, spanHi);
    } catch (err) {
      // Not known to be on the file: write again next time.
      for (const k of carried) this.dirty.add(k);
      if (spanLo < spanHi) this.bulkSpan(spanLo, spanHi);
      this.finish(new BitmapError(`bitmap ${this.path}: write failed: ${(err as Error).message}`), done);
      return;
    }
    this.writeGen++;
    this.finish(null, done);
  }

  private finish(err: Error | null, done: Deferred): void {
    this.inflight = null;
    this.inflightDone = null;
    if (err) done.reject(err);
    else done.resolve();
    this.kick();
  }

  // ---- checks ----------------------------------------------------------------------------------

  private checkRange(offset: number, length: number): void {
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0
      && offset + length <= this.lunSize)) {
      throw new RangeError(`bitmap ${this.path}: range ${offset}+${length} outside the LUN (${this.lunSize} bytes)`);
    }
  }

  private checkRegion(region: number): void {
    if (!(Number.isInteger(region) && region >= 0 && region < this.regions)) {
      throw new RangeError(`bitmap ${this.path}: region ${region} outside 0..${this.regions - 1}`);
    }
  }

  private failedError(): BitmapError {
    return new BitmapError(`bitmap ${this.path}: the bitmap failed: ${this.failure!.message}`);
  }

  private closedError(): BitmapError {
    return new BitmapError(`bitmap ${this.path}: the bitmap is closed`);
  }
}

/**
 * Write bytes [spanLo, spanHi) and the `carried` byte indexes outside it to the file, in runs of
 * nearby bytes, synchronously: a few bytes into the page cache cost microseconds, far less than
 * a thread-pool hop, and a synchronous write cannot be overtaken by an older one of the same byte.
 */
function writeRuns(fd: number, bits: Buffer, carried: Set<number>, spanLo: number, spanHi: number): void {
  const idx = [...carried].filter((k) => k < spanLo || k >= spanHi).sort((a, b) => a - b);
  const headerLen = bitmapHeader.span;
  const writeRun = (from: number, to: number) => {
    for (let done = 0; done < to - from;) {
      done += fs.writeSync(fd, bits, from + done, to - from - done, headerLen + from + done);
    }
  };
  if (spanLo < spanHi) writeRun(spanLo, spanHi);
  for (let i = 0; i < idx.length;) {
    let j = i;
    while (j + 1 < idx.length && idx[j + 1] - idx[j] <= COALESCE_GAP) j++;
    writeRun(idx[i], idx[j] + 1);
    i = j + 1;
  }
}

/** Set (or clear) the bits of regions [first, end), whole bytes at a time; returns the change in set bits. */
function fillBits(bits: Buffer, first: number, end: number, set: boolean): number {
  let delta = 0;
  for (let r = first; r < end;) {
    const k = r >>> 3;
    const from = r & 7;
    const to = Math.min(8, from + (end - r));
    const m = ((0xff << from) & (0xff >> (8 - to))) & 0xff;
    const old = bits[k];
    const now = set ? old | m : old & ~m;
    if (now !== old) {
      bits[k] = now;
      delta += popcount8(now) - popcount8(old);
    }
    r += to - from;
  }
  return delta;
}

function regionCount(lunSize: number, regionSize: number): number {
  return Math.ceil(lunSize / regionSize);
}


function encodeBitmapHeader(lunSize: number, regionSize: number): Buffer {
  return encodeHeader(BITMAP_HEADER, { magic: BITMAP_MAGIC, version: BITMAP_VERSION, lunSize, regionSize, headerCrc: 0 });
}

async function checkHeader(fd: number, path: string, size: number, lunSize: number, regionSize: number): Promise<void> {
  const fail = (what: string) => new BitmapError(`bitmap ${path}: ${what}`);
  const { fields: h } = await readHeader(BITMAP_HEADER, fd, size, fail);
  if (h.lunSize !== lunSize || h.regionSize !== regionSize) {
    const was = `LUN of ${h.lunSize} bytes with ${h.regionSize}-byte regions`;
    const now = `${lunSize} bytes with ${regionSize}-byte regions`;
    throw fail(`was made for a ${was}, now ${now}: the dirty regions it records do not map onto the new geometry`);
  }
}
