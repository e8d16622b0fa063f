// Online verify: compare both copies by range hashes (coarse ranges, then the regions of those
// that differ) while hosts keep writing; each range's writes wait while it is hashed on both
// sides, so a difference is never an artefact of a write in flight. With repair, differing
// regions are marked and resent by the catch-up worker.
import { hashRange } from '../../storage/hash.js';
import type { WorkerContext } from './worker-context.js';
import type { Replicator } from './replicator.js';

/** Returns the differing regions. */
export async function verify(c: WorkerContext, repair: boolean, coarseBytes: number): Promise<number[]> {
  const r = c.r;
  if (r.verifying) throw new Error('a verify of this LUN is already running');
  if (r.state !== 'uptodate' || r.path !== 'live') throw new Error(`the mirror is ${r.state} (${r.reason}); verify needs it up to date`);
  const size = r.backing.size;
  const rs = r.store.bitmap.regionSize;
  const coarse = Math.max(rs, Math.floor(coarseBytes / rs) * rs);
  r.verifying = { done: 0, total: size, startedMs: Date.now() };
  const differing: number[] = [];
  try {
    for (let off = 0; off < size; off += coarse) {
      const len = Math.min(coarse, size - off);
      await c.rate.take(len);
      if (!(await rangeEqual(r, off, len))) {
        for (let k = off / rs; k * rs < off + len; k++) {
          if (!(await rangeEqual(r, k * rs, Math.min(rs, size - k * rs)))) differing.push(k);
        }
      }
      r.verifying.done = off + len;
      c.logProgress('verify', r.verifying.done, size);
    }
  } finally {
    r.verifying = null;
  }
  if (repair && differing.length) {
    const { resyncNeeded } = r.dirty;
    for (const k of differing) {
      const m = r.store.bitmap.mark(k * rs, 1);
      if (m) await m;
      resyncNeeded.add(k);
    }
    await r.store.bitmap.sync();
    while (r.linkUp && differing.some((k) => resyncNeeded.has(k))) {
      c.kick();
      await c.worker;
    }
    if (differing.some((k) => resyncNeeded.has(k))) throw new Error('the link went down during the repair; it completes after reconnect');
  }
  return differing;
}

async function rangeEqual(r: Replicator, offset: number, length: number): Promise<boolean> {
  const token = await r.gate.enter(offset, length);
  try {
    const local = await hashRange(r.backing, offset, length);
    const remote = await r.hashPeer(offset, length, r.seq.doneHigh);
    if (!remote) throw new Error('the link went down during the verify');
    return remote.equals(local);
  } finally {
    r.gate.leave(token);
  }
}
