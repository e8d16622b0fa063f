// decidePairing (src/mirror/pairing.ts): the receiver's verdict on an offered primary LUN from
// both sides' generation ids, as a table: status and sync of every case, for a local secondary
// and for a LUN that is primary here too.
import { expect } from 'chai';
import { NO_GENERATION, type LunMetaData } from '../../src/persist/lun-meta.js';
import { decidePairing } from '../../src/mirror/pairing.js';
import { OFFER_FLAG, PAIR, SYNC, type Lineage, type LunOffer } from '../../src/mirror/wire.js';

// Generation ids (16 hex digits), named for readability.
const G = {
  a: 'aaaaaaaaaaaaaaaa', b: 'bbbbbbbbbbbbbbbb', c: 'cccccccccccccccc', d: 'dddddddddddddddd',
  e: 'eeeeeeeeeeeeeeee', x: '1111111111111111', y: '2222222222222222', z: '3333333333333333',
};

function offer(lineage: Partial<Lineage>, flags = 0): LunOffer {
  return {
    id: 0, name: 'lun0', size: 1 << 20, instance: Buffer.alloc(8, 1), nextSeq: 1, flags,
    lineage: { current: G.a, history: [], peerBase: '', ...lineage },
  };
}

function local(data: Partial<LunMetaData>): LunMetaData {
  return {
    version: 1, lun: 'lun0', size: 1 << 20, role: null, current: NO_GENERATION, history: [], consistent: true,
    localChanges: false, splitBrain: null, discardPeer: false, peerBase: '', syncCompare: false, updatedMs: 0, ...data,
  };
}

const SPLIT = { detectedMs: 1, peerCurrent: G.z };
const NAMES: Record<number, string> = Object.fromEntries(Object.entries(PAIR).map(([k, v]) => [v, k]));
const SYNCS: Record<number, string> = Object.fromEntries(Object.entries(SYNC).map(([k, v]) => [v, k]));

interface Case {
  name: string;
  offer: LunOffer;
  local: LunMetaData;
  role: 'primary' | 'secondary';
  status: number;
  sync: number;
}

const CASES: Case[] = [
  // ---- the LUN is a secondary here ----
  {
    name: 'fresh secondary (NO_GENERATION): initial sync',
    offer: offer({ current: G.b, history: [G.a], peerBase: '' }), local: local({}), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'fresh secondary, even an inconsistent one with local changes',
    offer: offer({ current: G.b, peerBase: G.c }), local: local({ consistent: false, localChanges: true }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'secondary current == the offer\'s peerBase, consistent, no local changes: incremental',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.a, history: [G.x] }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.INCREMENTAL,
  },
  {
    name: 'secondary current == peerBase (peerBase is also the offer\'s current: nothing written since)',
    offer: offer({ current: G.a, history: [], peerBase: G.a }), local: local({ current: G.a }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.INCREMENTAL,
  },
  {
    name: 'secondary current == peerBase but inconsistent (an interrupted resync): full',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.a, consistent: false }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'secondary current == peerBase but with local changes (written here as primary): full',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.a, localChanges: true }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'secondary current in the offer\'s history, but not its peerBase: full',
    offer: offer({ current: G.c, history: [G.b, G.a], peerBase: G.b }), local: local({ current: G.a }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'secondary current in the offer\'s history, offer without peerBase: full',
    offer: offer({ current: G.c, history: [G.b, G.a], peerBase: '' }), local: local({ current: G.b }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'secondary current == the offer\'s current, not its peerBase: full',
    offer: offer({ current: G.c, history: [G.b], peerBase: G.b }), local: local({ current: G.c }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'offer current in the secondary\'s history (the secondary is newer): PEER_NEWER',
    offer: offer({ current: G.a, history: [], peerBase: G.a }), local: local({ current: G.b, history: [G.a] }), role: 'secondary',
    status: PAIR.PEER_NEWER, sync: SYNC.FULL,
  },
  {
    name: 'offer current deep in the secondary\'s history: PEER_NEWER',
    offer: offer({ current: G.a, history: [G.x] }), local: local({ current: G.d, history: [G.c, G.b, G.a, G.x] }), role: 'secondary',
    status: PAIR.PEER_NEWER, sync: SYNC.FULL,
  },
  {
    name: 'unrelated generations: SPLIT_BRAIN',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.c, history: [G.x] }), role: 'secondary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'a common ancestor only (both moved on from it): SPLIT_BRAIN',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.c, history: [G.a] }), role: 'secondary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'secondary with a split brain recorded: SPLIT_BRAIN even for an offer that would be incremental',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }), local: local({ current: G.a, splitBrain: SPLIT }), role: 'secondary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'secondary with a split brain recorded and no generation: SPLIT_BRAIN',
    offer: offer({ current: G.b }), local: local({ splitBrain: SPLIT }), role: 'secondary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'FORCE: OK FULL although the generations are unrelated',
    offer: offer({ current: G.b, history: [G.a] }, OFFER_FLAG.FORCE), local: local({ current: G.c, history: [G.x] }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'FORCE: OK FULL although a split brain is recorded',
    offer: offer({ current: G.b }, OFFER_FLAG.FORCE), local: local({ current: G.c, splitBrain: SPLIT }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'FORCE: OK FULL (not incremental) even when the secondary is the peerBase',
    offer: offer({ current: G.b, history: [G.a], peerBase: G.a }, OFFER_FLAG.FORCE), local: local({ current: G.a }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'FORCE among other flag bits',
    offer: offer({ current: G.b }, OFFER_FLAG.FORCE | 0x8000), local: local({ current: G.c }), role: 'secondary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'other flag bits are not FORCE',
    offer: offer({ current: G.b }, 0xfffe), local: local({ current: G.c }), role: 'secondary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },

  // ---- the LUN is a primary here too ----
  {
    name: 'primary here, same current: NOT_SECONDARY',
    offer: offer({ current: G.a, history: [G.x] }), local: local({ current: G.a, history: [G.x] }), role: 'primary',
    status: PAIR.NOT_SECONDARY, sync: SYNC.FULL,
  },
  {
    name: 'primary here, the offering primary\'s current in our history (we were promoted from it): PEER_NEWER',
    offer: offer({ current: G.a, history: [G.x], peerBase: G.x }), local: local({ current: G.b, history: [G.a, G.x] }), role: 'primary',
    status: PAIR.PEER_NEWER, sync: SYNC.FULL,
  },
  {
    name: 'primary here, our current in the offer\'s history (the offer is newer): STALE_PRIMARY',
    offer: offer({ current: G.c, history: [G.b, G.a] }), local: local({ current: G.a }), role: 'primary',
    status: PAIR.STALE_PRIMARY, sync: SYNC.FULL,
  },
  {
    name: 'primary here, unrelated generations: SPLIT_BRAIN',
    offer: offer({ current: G.b, history: [G.a] }), local: local({ current: G.c, history: [G.x] }), role: 'primary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'primary here, a common ancestor only: SPLIT_BRAIN',
    offer: offer({ current: G.b, history: [G.a] }), local: local({ current: G.c, history: [G.a] }), role: 'primary',
    status: PAIR.SPLIT_BRAIN, sync: SYNC.FULL,
  },
  {
    name: 'primary here, FORCE: OK FULL (our data is discarded)',
    offer: offer({ current: G.b, history: [G.a] }, OFFER_FLAG.FORCE), local: local({ current: G.c, history: [G.x] }), role: 'primary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
  {
    name: 'primary here, FORCE wins over the same current',
    offer: offer({ current: G.a }, OFFER_FLAG.FORCE), local: local({ current: G.a }), role: 'primary',
    status: PAIR.OK, sync: SYNC.FULL,
  },
];

describe('mirror pairing: decidePairing', function () {
  for (const c of CASES) {
    it(`${c.role}: ${c.name} → ${NAMES[c.status]} ${SYNCS[c.sync]}`, function () {
      const snapshot = JSON.stringify({ offer: c.offer, local: c.local });
      const v = decidePairing(c.offer, c.local, c.role);
      expect({ status: NAMES[v.status] ?? v.status, sync: SYNCS[v.sync] ?? v.sync }).to.deep.equal({ status: NAMES[c.status], sync: SYNCS[c.sync] });
      expect(v.reason, 'a reason for the log').to.be.a('string').that.is.not.empty;
      expect(JSON.stringify({ offer: c.offer, local: c.local }), 'decidePairing mutated its inputs').to.equal(snapshot);
    });
  }

  it('a refusal never asks for an incremental sync', function () {
    for (const c of CASES) {
      const v = decidePairing(c.offer, c.local, c.role);
      if (v.status !== PAIR.OK) expect(v.sync, c.name).to.equal(SYNC.FULL);
    }
  });
});
