// Resync: copy every stale region (resyncNeeded) from local data, RESYNC-flagged (the peer is
// inconsistent until SET_GEN), while new writes are mirrored live; regions still to compare are
// compared first (compare.ts) and only those that differ are sent.
import { MIRROR_FLAG, MIRROR_OP } from '../wire.js';
import type { WorkerContext } from './worker-context.js';
import { TurnBudget } from './catch-up-walk.js';
import { compare } from './compare.js';
import type { LinkSession } from './link-session.js';
import { PendingOp, type Replicator } from './replicator.js';

const RESYNC_WINDOW_BYTES = 32 * 1024 * 1024;
/**
 * Consecutive stale regions go as one request of up to this many bytes (a region per request
 * made a 1 GiB initial sync 16k round trips), cut where data turns into hole and back.
 */
const RESYNC_RUN_BYTES = 1024 * 1024;

/** The run of stale regions from k to send as one request: all hole (sent as a zero) or read. */
function runOf(r: Replicator, k: number): { n: number; start: number; len: number; hole: boolean } {
  const { backing } = r;
  const todo = r.dirty.resyncNeeded;
  const size = r.store.bitmap.regionSize;
  const start = k * size;
  const most = Math.max(1, Math.floor(RESYNC_RUN_BYTES / size));
  let n = 1;
  while (n < most && k + n < todo.regions && todo.has(k + n)) n++;
  let len = Math.min(n * size, backing.size - start);
  if (backing.isBlockDevice) return { n, start, len, hole: false };
  const [e] = backing.extents(start, len, 1);
  if (e && e.length < len) {
    // Cut at the end of the first extent (whole regions; a region that mixes both is read).
    n = Math.max(1, Math.floor(e.length / size));
    len = Math.min(n * size, backing.size - start);
  }
  return { n, start, len, hole: e !== undefined && e.hole && e.length >= len };
}

export async function resync(c: WorkerContext, s: LinkSession): Promise<void> {
  const r = c.r;
  const { backing, gate, seq, progress } = r;
  if (r.path === 'bitmap') {
    await r.store.journal.reset();
    r.path = 'live';
    r.offlineRotated = false;
  }
  if (r.dirty.compareNeeded.size > 0) await compare(c, s);
  if (!r.still(s, 'live')) return;
  const todo = r.dirty.resyncNeeded;
  r.transition('resyncing', `${todo.size} regions to copy from local data (the secondary is inconsistent until done)`);
  progress.resyncTotal = todo.size;
  progress.resyncDone = 0;
  progress.startedMs = Date.now();
  const turn = new TurnBudget();
  let sent = 0;
  // In region order, straight from the set's bits: regions added ahead of the walk go in this pass.
  for (let k = todo.next(0), n = 1; k >= 0; k = todo.next(k + n)) {
    if (!r.still(s, 'live')) return;
    while (seq.inflightBytes >= RESYNC_WINDOW_BYTES) {
      await r.sleep();
      if (!r.still(s, 'live')) return;
    }
    n = 1;
    if (!todo.has(k)) continue;
    const { start, len, hole, n: run } = runOf(r, k);
    n = run;
    await c.rate.take(len);
    const token = await gate.enter(start, len);
    try {
      if (!r.still(s, 'live')) return;
      let data: Buffer | null = null;
      if (!hole) {
        data = Buffer.allocUnsafe(len);
        await backing.read(data, start);
      }
      if (!r.still(s, 'live')) return;
      const q = seq.take();
      r.genNeeded = true;
      const op = new PendingOp(r, hole ? MIRROR_OP.WRITE_ZEROES : MIRROR_OP.WRITE,
        (hole ? MIRROR_FLAG.MAY_PUNCH : 0) | MIRROR_FLAG.RESYNC, r.lunId, q, seq.doneHigh, start, len, data, 'resync', k);
      r.track(op);
      r.link.send(op);
      seq.localDone(q);   // its data was read before it went: later requests may depend on it
      sent += n;
      if (sent > progress.resyncTotal) progress.resyncTotal = sent;
      c.logProgress('resync', progress.resyncDone, progress.resyncTotal);
    } finally {
      gate.leave(token);
    }
    await turn.yield();
  }
  while (r.still(s, 'live') && seq.inflight > 0 && todo.size > 0) await r.sleep();
}
