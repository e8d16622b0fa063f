// SHA-256 of a range of a backing store (initial sync, verify): both sites hash the same bytes
// the same way, so equal digests mean equal copies. Holes are not read: they hash as the zeros
// they read as, and a range that is all hole costs one extent lookup and a digest of zeros that
// is computed once per length (sparse LUNs compare at the speed of the lookups).
import crypto from 'node:crypto';
import { setImmediate as yieldTurn } from 'node:timers/promises';
import type { Backing } from './backing.js';

const CHUNK = 4 * 1024 * 1024;
/** Never written: the bytes a hole reads as. */
const ZEROS = Buffer.alloc(CHUNK);
/** Distinct lengths whose zero digest is kept (coarse ranges, regions, the LUN's tails). */
const ZERO_DIGESTS_KEPT = 16;
const zeroDigests = new Map<number, Promise<Buffer>>();
/**
 * Chunks kept for the next pieces: a fresh 1 MiB buffer per piece made the garbage collector
 * a sixth of a sync's time (external memory forces full collections).
 */
const SPARE_KEPT = 16;
const spare: Buffer[] = [];

export async function hashRange(backing: Backing, offset: number, length: number): Promise<Buffer> {
  if (!backing.isBlockDevice) {
    const [first] = backing.extents(offset, length, 1);
    if (first && first.hole && first.length >= length) return zeroDigest(length);
  }
  if (length <= CHUNK) return hashPiece(backing, offset, length);
  const hash = crypto.createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  const end = offset + length;
  for (let at = offset; at < end;) {
    const [e] = backing.extents(at, end - at, 1);
    const stop = Math.min(end, at + e.length);
    if (e.hole) {
      await feedZeros(hash, stop - at);
    } else {
      for (let pos = at; pos < stop;) {
        const n = Math.min(buf.length, stop - pos);
        const view = n === buf.length ? buf : buf.subarray(0, n);
        await backing.read(view, pos);
        hash.update(view);
        pos += n;
      }
    }
    at = stop;
  }
  return hash.digest();
}

/**
 * A range of one chunk is read whole and hashed by WebCrypto, which runs in the thread pool:
 * the event loop stays free for hosts, and both cores hash while the peer hashes too (the
 * streaming Hash of longer ranges runs on the event loop). Holes read as zeros, as they hash.
 */
async function hashPiece(backing: Backing, offset: number, length: number): Promise<Buffer> {
  const chunk = spare.pop() ?? Buffer.allocUnsafe(CHUNK);
  try {
    const buf = chunk.subarray(0, length);
    await backing.read(buf, offset);
    return Buffer.from(await crypto.subtle.digest('SHA-256', buf));
  } finally {
    if (spare.length < SPARE_KEPT) spare.push(chunk);
  }
}

/** SHA-256 of `length` zero bytes (shared by concurrent callers, kept for the next ones). */
export function zeroDigest(length: number): Promise<Buffer> {
  let p = zeroDigests.get(length);
  if (p) {
    zeroDigests.delete(length);   // most recently used last
    zeroDigests.set(length, p);
    return p;
  }
  p = (async () => {
    const hash = crypto.createHash('sha256');
    await feedZeros(hash, length);
    return hash.digest();
  })();
  zeroDigests.set(length, p);
  p.catch(() => zeroDigests.delete(length));
  if (zeroDigests.size > ZERO_DIGESTS_KEPT) zeroDigests.delete(zeroDigests.keys().next().value!);
  return p;
}

/** Hash `n` zeros a chunk per event-loop turn (64 MiB is ~70 ms of SHA-256: hosts and heartbeats go between). */
async function feedZeros(hash: crypto.Hash, n: number): Promise<void> {
  for (let left = n; left > 0;) {
    const k = Math.min(CHUNK, left);
    hash.update(k === CHUNK ? ZEROS : ZEROS.subarray(0, k));
    left -= k;
    if (left > 0) await yieldTurn();
  }
}
