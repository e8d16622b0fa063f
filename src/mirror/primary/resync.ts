// Resync: copy every stale region (resyncNeeded) from local data, RESYNC-flagged (the peer is
// inconsistent until SET_GEN), while new writes are mirrored live; regions still to compare are
// compared first (compare.ts) and only those that differ are sent.
import { MIRROR_FLAG, MIRROR_OP } from '../wire.js';
import type { WorkerContext } from './worker-context.js';
import { TurnBudget } from './catch-up-walk.js';
import { compare } from './compare.js';
import type { LinkSession } from './link-session.js';
import { PendingOp } from './replicator.js';

const RESYNC_WINDOW_BYTES = 16 * 1024 * 1024;

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
  const size = r.store.bitmap.regionSize;
  const turn = new TurnBudget();
  let sent = 0;
  // In region order, straight from the set's bits: regions added ahead of the walk go in this pass.
  for (let k = todo.next(0); k >= 0; k = todo.next(k + 1)) {
    if (!r.still(s, 'live')) return;
    while (seq.inflightBytes >= RESYNC_WINDOW_BYTES) {
      await r.sleep();
      if (!r.still(s, 'live')) return;
    }
    if (!todo.has(k)) continue;
    const start = k * size;
    const len = Math.min(size, backing.size - start);
    await c.rate.take(len);
    const token = await gate.enter(start, len);
    try {
      if (!r.still(s, 'live')) return;
      const hole = !backing.isBlockDevice && backing.extents(start, len, 2).every((e) => e.hole);
      let data: Buffer | null = null;
      if (!hole) {
        data = Buffer.allocUnsafe(len);
        await backing.read(data, start);
      }
      if (!r.still(s, 'live')) return;
      const n = seq.take();
      r.genNeeded = true;
      const op = new PendingOp(r, hole ? MIRROR_OP.WRITE_ZEROES : MIRROR_OP.WRITE,
        (hole ? MIRROR_FLAG.MAY_PUNCH : 0) | MIRROR_FLAG.RESYNC, r.lunId, n, seq.doneHigh, start, len, data, 'resync', k);
      r.track(op);
      r.link.send(op);
      seq.localDone(n);   // its data was read before it went: later requests may depend on it
      if (++sent > progress.resyncTotal) progress.resyncTotal = sent;
      c.logProgress('resync', progress.resyncDone, progress.resyncTotal);
    } finally {
      gate.leave(token);
    }
    await turn.yield();
  }
  while (r.still(s, 'live') && seq.inflight > 0 && todo.size > 0) await r.sleep();
}
