// A set of region numbers as one bit per region (the layout of the bitmap file: region r is bit
// r & 7 of byte r >>> 3). A 1 TiB LUN of 64 KiB regions has 16.7 M regions: as a Set<number>
// that is ~1 GiB and seconds to build; as bits it is 2 MiB, and walking it in order skips
// empty stretches a word at a time.

/** First set bit at or after `from` and before `limit`, or -1. Scans 32-bit words where it can. */
export function nextSetBit(bits: Uint8Array, from: number, limit: number): number {
  if (from < 0) from = 0;
  if (from >= limit) return -1;
  const endByte = Math.min(bits.length, Math.ceil(limit / 8));
  let k = from >>> 3;
  // The first (partial) byte.
  const head = bits[k] & (0xff << (from & 7)) & 0xff;
  if (head !== 0) return checked(k * 8 + lowBit(head), limit);
  k++;
  // Bytes up to a word boundary, then whole words (a zero word is zero in either byte order).
  while (k < endByte && ((bits.byteOffset + k) & 3) !== 0) {
    if (bits[k] !== 0) return checked(k * 8 + lowBit(bits[k]), limit);
    k++;
  }
  if (k + 4 <= endByte) {
    const words = new Uint32Array(bits.buffer, bits.byteOffset + k, (endByte - k) >>> 2);
    let w = 0;
    while (w < words.length && words[w] === 0) w++;
    k += w * 4;
  }
  for (; k < endByte; k++) if (bits[k] !== 0) return checked(k * 8 + lowBit(bits[k]), limit);
  return -1;
}

/** First clear bit at or after `from` and before `limit`, or -1 (full words skipped a word at a time). */
export function nextClearBit(bits: Uint8Array, from: number, limit: number): number {
  if (from < 0) from = 0;
  for (let r = from; r < limit;) {
    const k = r >>> 3;
    if ((r & 7) === 0 && ((bits.byteOffset + k) & 3) === 0 && k + 4 <= bits.length) {
      const word = new Uint32Array(bits.buffer, bits.byteOffset + k, 1)[0];
      if (word === 0xffffffff) {
        r += 32;
        continue;
      }
    }
    if ((bits[k] & (1 << (r & 7))) === 0) return r;
    r++;
  }
  return -1;
}

/** Set bits among regions [first, first+n). */
export function countBits(bits: Uint8Array, first: number, n: number): number {
  let c = 0;
  let r = first;
  const end = first + n;
  while (r < end && (r & 7) !== 0) c += (bits[r >>> 3] >>> (r & 7)) & 1, r++;
  while (r + 8 <= end) c += popcount8(bits[r >>> 3]), r += 8;
  while (r < end) c += (bits[r >>> 3] >>> (r & 7)) & 1, r++;
  return c;
}

export function popcount8(b: number): number {
  b = b - ((b >> 1) & 0x55);
  b = (b & 0x33) + ((b >> 2) & 0x33);
  return (b + (b >> 4)) & 0x0f;
}

function lowBit(b: number): number {
  return 31 - Math.clz32(b & -b);
}

function checked(r: number, limit: number): number {
  return r < limit ? r : -1;
}

/** The regions of one LUN still to compare or to resend (in memory only; the bitmap file is the durable record). */
export class RegionSet {
  private readonly bits: Uint8Array;
  private count = 0;

  constructor(readonly regions: number) {
    this.bits = new Uint8Array(Math.ceil(regions / 8));
  }

  get size(): number {
    return this.count;
  }

  has(r: number): boolean {
    return r >= 0 && r < this.regions && (this.bits[r >>> 3] & (1 << (r & 7))) !== 0;
  }

  add(r: number): this {
    this.check(r);
    const m = 1 << (r & 7);
    if ((this.bits[r >>> 3] & m) === 0) {
      this.bits[r >>> 3] |= m;
      this.count++;
    }
    return this;
  }

  delete(r: number): boolean {
    if (!this.has(r)) return false;
    this.bits[r >>> 3] &= ~(1 << (r & 7));
    this.count--;
    return true;
  }

  /** Remove regions [first, first+n). */
  deleteRange(first: number, n: number): void {
    for (let r = first; r < first + n; r++) {
      if ((r & 7) === 0 && r + 8 <= first + n) {
        this.count -= popcount8(this.bits[r >>> 3]);
        this.bits[r >>> 3] = 0;
        r += 7;
      } else {
        this.delete(r);
      }
    }
  }

  /** Add regions [first, first+n). */
  addRange(first: number, n: number): void {
    if (n <= 0) return;
    this.check(first);
    this.check(first + n - 1);
    for (let r = first; r < first + n; r++) {
      if ((r & 7) === 0 && r + 8 <= first + n) {
        this.count += 8 - popcount8(this.bits[r >>> 3]);
        this.bits[r >>> 3] = 0xff;
        r += 7;
      } else {
        this.add(r);
      }
    }
  }

  /** Add every member of `other` (a set over as many regions). */
  addSet(other: RegionSet): void {
    this.addBits(other.bits);
  }

  /** Remove every member of `other` (a set over as many regions): a word-wise AND NOT. */
  deleteSet(other: RegionSet): void {
    const o = other.bits;
    for (let k = 0; k < o.length; k++) {
      const drop = this.bits[k] & o[k];
      if (drop === 0) continue;
      this.bits[k] &= ~drop;
      this.count -= popcount8(drop);
    }
  }

  clear(): void {
    this.bits.fill(0);
    this.count = 0;
  }

  /** First member at or after `from` (and before `limit`), or -1. */
  next(from: number, limit = this.regions): number {
    return nextSetBit(this.bits, from, Math.min(limit, this.regions));
  }

  /** First region at or after `from` that is not a member, or -1. */
  nextAbsent(from: number): number {
    return nextClearBit(this.bits, from, this.regions);
  }

  /** Members among regions [first, first+n). */
  countRange(first: number, n: number): number {
    return countBits(this.bits, first, Math.min(n, this.regions - first));
  }

  /** Add every region set in `bits` (same layout) that is not in `except`: a word-wise OR. */
  addBits(bits: Uint8Array, except?: RegionSet): void {
    if (bits.length !== this.bits.length) throw new RangeError(`region set of ${this.bits.length} bytes, bits of ${bits.length}`);
    const skip = except?.bits;
    for (let k = 0; k < bits.length; k++) {
      const add = bits[k] & ~(skip ? skip[k] : 0) & ~this.bits[k];
      if (add === 0) continue;
      this.bits[k] |= add;
      this.count += popcount8(add);
    }
  }

  private check(r: number): void {
    if (!(Number.isInteger(r) && r >= 0 && r < this.regions)) throw new RangeError(`region ${r} outside 0..${this.regions - 1}`);
  }
}
