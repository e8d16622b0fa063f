// Journal replay: send the journal in sequence order, from after what the peer has, while new
// writes queue behind it (they are journaled too); then go live. Sequence numbers must be dense:
// a missing record would leave the peer waiting, so it turns the replay into a resync instead.
import type { JournalEntry } from '../../persist/journal.js';
import { JOURNAL_KIND } from '../../persist/journal.js';
import { MIRROR_FLAG, MIRROR_OP } from '../wire.js';
import type { WorkerContext } from './worker-context.js';
import type { LinkSession } from './link-session.js';
import { PendingOp } from './replicator.js';

const REPLAY_WINDOW_BYTES = 8 * 1024 * 1024;
const REPLAY_BATCH_BYTES = 2 * 1024 * 1024;

/** Replay within session `s`; returns the last sequence number sent. */
export async function replay(c: WorkerContext, s: LinkSession): Promise<number> {
  const r = c.r;
  const journal = r.store.journal;
  let lastSent = r.seq.ackedPrefix;   // the peer has everything up to here (see Sequencer.resumeAfter)
  const left = journal.records - firstIndexAfter(journal.entries(), lastSent);
  if (left > 0) r.transition('replaying', `${left} journal records to send`);
  r.progress.replayTotal = left;
  r.progress.replayDone = 0;
  r.progress.startedMs = Date.now();
  for (;;) {
    if (!r.still(s, 'journal')) return lastSent;
    const entries = journal.entries();
    const from = firstIndexAfter(entries, lastSent);
    if (from >= entries.length || entries[from].seq !== lastSent + 1) {
      if (r.appendsInFlight > 0) {
        await r.appendsSettled();
        continue;
      }
      if (from >= entries.length) break;
      // A record the peer needs is not there: sending what follows would only wait for it.
      r.log.error('journal replay cannot continue in order: a sequence number is missing; the dirty regions are resynced instead', {
        lun: r.lun, missing: lastSent + 1, next: entries[from].seq,
      });
      await r.overflow(`journal has no record ${lastSent + 1}`);
      r.link.disconnect(`LUN ${r.lun}: journal gap, renegotiating`);
      return lastSent;
    }
    if (r.replayBytes >= REPLAY_WINDOW_BYTES) {
      await r.sleep();
      continue;
    }
    // A batch of records (up to REPLAY_BATCH_BYTES), their data read together.
    const batch: JournalEntry[] = [];
    let bytes = 0;
    // (Consecutive records only: a gap is found, above, before anything after it is sent.)
    for (let k = from; k < entries.length && bytes < REPLAY_BATCH_BYTES && entries[k].seq === entries[from].seq + (k - from); k++) {
      batch.push(entries[k]);
      bytes += entries[k].length;
    }
    const writes = batch.filter((e) => e.kind === JOURNAL_KIND.WRITE);
    const datas = await journal.readDataMany(writes);
    if (!r.still(s, 'journal')) return lastSent;
    const extra = r.replayAsResync ? MIRROR_FLAG.RESYNC : 0;
    let w = 0;
    for (const e of batch) {
      const isWrite = e.kind === JOURNAL_KIND.WRITE;
      const data = isWrite ? datas[w++] : null;
      const flags = e.flags | extra;
      if (flags & MIRROR_FLAG.RESYNC) r.genNeeded = true;
      const op = new PendingOp(r, isWrite ? MIRROR_OP.WRITE : MIRROR_OP.WRITE_ZEROES, flags, r.lunId, e.seq, e.dep,
        e.offset, e.length, data, 'replay');
      r.replayBytes += e.length;
      lastSent = e.seq;
      r.link.send(op);
    }
    r.progress.replayTotal = journal.records;   // records stay until the reset after the replay
    c.logProgress('replay', r.progress.replayDone, r.progress.replayTotal);
  }
  // Caught up (nothing left, no append in flight): from here new writes go to the peer directly.
  r.path = 'live';
  r.offlineRotated = false;
  if (r.progress.replayTotal > 0) {
    r.log.info('journal replayed; mirroring live again', { lun: r.lun, records: r.progress.replayTotal });
  }
  const target = r.seq.issued;
  if ((await r.peerFlush()) === 0 && r.path === 'live' && journal.maxSeq <= target && r.appendsInFlight === 0) {
    await journal.reset();
    r.dirty.clearQuiet();
  }
  return lastSent;
}

/** Index of the first journal entry with a sequence number above `seq` (entries are sorted by seq). */
export function firstIndexAfter(entries: readonly JournalEntry[], seq: number): number {
  let lo = 0;
  let hi = entries.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (entries[mid].seq <= seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
