// SHA-256 of a range of a backing store, read in bounded chunks (initial sync, verify): both
// sites hash the same bytes the same way, so equal digests mean equal copies.
import crypto from 'node:crypto';
import type { Backing } from './backing.js';

const CHUNK = 4 * 1024 * 1024;

export async function hashRange(backing: Backing, offset: number, length: number): Promise<Buffer> {
  const hash = crypto.createHash('sha256');
  const buf = Buffer.allocUnsafe(Math.min(CHUNK, length));
  for (let done = 0; done < length;) {
    const n = Math.min(buf.length, length - done);
    const view = n === buf.length ? buf : buf.subarray(0, n);
    await backing.read(view, offset + done);
    hash.update(view);
    done += n;
  }
  return hash.digest();
}
