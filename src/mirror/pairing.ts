// Whether, and how, an offered primary LUN may feed the secondary of the same name: the
// generation ids of both (lun/lun-meta.ts) decide between catching up from the primary's
// journal and bitmap, comparing every region (initial sync), or refusing (split brain, a
// stale primary). Never a silent merge: any lineage that is not plainly one copy of the other
// is a split brain, and the LUN stays apart until the operator resolves it.
import { NO_GENERATION, type LunMetaData } from '../persist/lun-meta.js';
import { OFFER_FLAG, PAIR, SYNC, type LunOffer } from './wire.js';

export interface PairingVerdict {
  status: number;
  sync: number;
  /** Why, for the log. */
  reason: string;
}

/**
 * The receiver's decision for `offer` against its own LUN's metadata.
 * `localRole` is the LUN's role here now (after promote/demote).
 */
export function decidePairing(offer: LunOffer, local: LunMetaData, localRole: 'primary' | 'secondary'): PairingVerdict {
  const p = offer.lineage;
  const force = (offer.flags & OFFER_FLAG.FORCE) !== 0;
  const inP = (g: string) => g === p.current || p.history.includes(g);
  const inLocal = (g: string) => g === local.current || local.history.includes(g);

  if (localRole === 'primary') {
    if (force) return { status: PAIR.OK, sync: SYNC.FULL, reason: 'the peer resolved a split brain by discarding this site\'s data' };
    if (local.current === p.current) return { status: PAIR.NOT_SECONDARY, sync: SYNC.FULL, reason: 'both sites have it as primary' };
    if (local.history.includes(p.current)) {
      return { status: PAIR.PEER_NEWER, sync: SYNC.FULL, reason: 'this site was promoted from the offering primary\'s data; it must be demoted' };
    }
    if (p.history.includes(local.current)) {
      return { status: PAIR.STALE_PRIMARY, sync: SYNC.FULL, reason: 'this site\'s primary has older data than the offering one: demote it here' };
    }
    return { status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL, reason: 'both sites wrote as primary while apart' };
  }
  if (force) return { status: PAIR.OK, sync: SYNC.FULL, reason: 'split brain resolved by the peer: this copy is overwritten' };
  if (local.splitBrain) return { status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL, reason: 'a split brain was detected and is not resolved' };
  if (local.current === NO_GENERATION) return { status: PAIR.OK, sync: SYNC.FULL, reason: 'initial sync: this copy has no generation yet' };
  const clean = local.consistent && !local.localChanges;
  if (clean && local.current === p.peerBase) {
    return { status: PAIR.OK, sync: SYNC.INCREMENTAL, reason: 'the primary\'s journal and bitmap cover what this copy lacks' };
  }
  if (inP(local.current)) {
    const why = !local.consistent ? 'an interrupted resync' : local.localChanges ? 'changes made here as primary' : 'no journal coverage';
    return { status: PAIR.OK, sync: SYNC.FULL, reason: `full compare: same history, but ${why}` };
  }
  if (inLocal(p.current)) return { status: PAIR.PEER_NEWER, sync: SYNC.FULL, reason: 'this copy is newer than the offering primary' };
  return { status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL, reason: 'unrelated generations: both sites wrote as primary while apart' };
}
