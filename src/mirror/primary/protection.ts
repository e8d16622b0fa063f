// What protects a mirrored primary LUN's acknowledged writes right now: the peer's copy, or only
// this site (README "Protection"). One definition for status, metrics and the state log line.
import type { MirrorState } from './mirror-state.js';

/**
 * - `peer`: sync and uptodate: every acknowledged write is on the peer's copy, and that copy is
 *   consistent, so a promote there keeps it.
 * - `peer-async`: async and uptodate: writes reach the peer shortly after their ack; a failover
 *   loses at most what is in flight (`lagBytes`, bounded by mirror.asyncWindowBytes).
 * - `local-only`: any other state of a mirrored primary. New writes are kept on this site (its
 *   data and journal or bitmap) and are not on a copy the peer could take over with:
 *   connecting / journaling / probation / unpaired / split-brain (the peer gets nothing),
 *   replaying (the peer is consistent but behind), syncing / resyncing (the peer's copy is
 *   inconsistent: writes are mirrored live, but a promote of the peer rolls the interrupted
 *   sync back, and with it every write acknowledged since it began).
 */
export type Protection = 'peer' | 'peer-async' | 'local-only';

export function protectionOf(state: MirrorState | 'probation', mode: 'sync' | 'async'): Protection {
  if (state === 'uptodate') return mode === 'sync' ? 'peer' : 'peer-async';
  return 'local-only';
}

/** Why a LUN is `local-only`, in words for status and the log; null when the peer protects it. */
export function protectionReason(state: MirrorState | 'probation'): string | null {
  switch (state) {
    case 'uptodate': return null;
    case 'replaying': return 'the peer is consistent but behind: it lacks the journal being replayed and the writes queued behind it';
    case 'syncing':
    case 'resyncing':
      return 'the peer\'s copy is inconsistent until the sync completes: a promote there rolls it back to its state before the sync, without the writes acknowledged since';
    case 'split-brain': return 'split brain: the peer is not fed until it is resolved';
    case 'unpaired': return 'the peer refused this LUN: writes only mark the dirty bitmap here';
    default: return 'the peer is not reachable: writes are journaled (or marked in the dirty bitmap) here';
  }
}

export interface CatchupProgress {
  replayTotal: number; replayDone: number; resyncTotal: number; resyncDone: number;
  syncTotal?: number; syncDone?: number; startedMs: number;
}

/**
 * Done, total and estimated seconds left of the replay, resync or initial sync under way (by the
 * rate so far); null when the state has none, or nothing is done yet to estimate from.
 */
export function catchup(state: string, p: CatchupProgress | undefined, now = Date.now()): { done: number; total: number; etaSeconds: number | null } | null {
  if (!p || !p.startedMs) return null;
  const [done, total] = state === 'replaying' ? [p.replayDone, p.replayTotal] : state === 'resyncing' ? [p.resyncDone, p.resyncTotal]
    : state === 'syncing' ? [p.syncDone ?? 0, p.syncTotal ?? 0] : [0, 0];
  if (!total) return null;
  const elapsed = (now - p.startedMs) / 1000;
  return { done, total, etaSeconds: done > 0 ? Math.round((elapsed / done) * (total - done)) : null };
}
