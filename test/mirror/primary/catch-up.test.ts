// CatchUp over a fake link: a replay cut by an outage stops through its session token (nothing
// is sent after the cut, and a new session replays from the acked prefix, not from where the old
// one stopped); resync sends exactly the stale regions; a full compare sends only what differs.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { expect } from 'chai';
import { CatchUp } from '../../../src/mirror/primary/catch-up.js';
import { LinkSession } from '../../../src/mirror/primary/link-session.js';
import { RateLimiter } from '../../../src/mirror/primary/rate-limit.js';
import { Replicator } from '../../../src/mirror/primary/replicator.js';
import { MIRROR_FLAG, MIRROR_OP } from '../../../src/mirror/wire.js';
import { JOURNAL_KIND } from '../../../src/persist/journal.js';
import { openStore, silent, writeAt, type Store, type StoreOptions } from './support.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const RS = 64 * KiB;

const isWrite = (op: { type: number }) => op.type === MIRROR_OP.WRITE || op.type === MIRROR_OP.WRITE_ZEROES;

describe('CatchUp', function () {
  this.timeout(30_000);
  let st: Store;
  let r: Replicator;
  let c: CatchUp;

  async function setup(opts: StoreOptions & { size: number }): Promise<void> {
    st = await openStore(opts);
    r = new Replicator('lun0', 'sync', st.backing, st.link, { journal: st.journal, bitmap: st.bitmap, maxJournalBytes: 256 * MiB },
      8 * MiB, silent(), st.meta);
    c = new CatchUp(r, new RateLimiter(1024 * MiB));
    // What LunMirror.linkDown does when the pool reports the outage.
    st.link.onDown = (reason) => {
      r.session?.end();
      r.enterOutage(`link down: ${reason}`);
    };
  }

  /** What LunMirror.paired does on a peer's OK (the peer applied nothing of this run). */
  function pair(): void {
    st.link.up = true;
    r.session?.end();
    r.session = new LinkSession();
    c.kick();
  }

  afterEach(async () => {
    await st.close();
  });

  describe('replay', function () {
    const RECORD = 256 * KiB;
    const RECORDS = 64;   // 16 MiB: twice the replay window (8 MiB)

    beforeEach(async () => {
      await setup({ size: RECORDS * RECORD });
      for (let seq = 1; seq <= RECORDS; seq++) {
        await st.journal.append({ seq, dep: seq - 1, offset: (seq - 1) * RECORD, length: RECORD, flags: 0, kind: JOURNAL_KIND.WRITE, data: randomBytes(RECORD) });
      }
      r.seq.restore(RECORDS, 0);
      st.peer.hold = true;
    });

    it('an outage mid-replay stops it: nothing is sent after the cut, the journal stays whole', async function () {
      pair();
      await st.link.sentCount(32);   // the window is full: the replay sleeps
      expect(r.state).to.equal('replaying');
      const before = st.link.sent.length;
      st.link.disconnect('cut');
      await c.worker;
      expect(st.link.sent.length, 'sent after the cut').to.equal(before);
      expect(st.link.sentWhileDown, 'sent into the dead link').to.deep.equal([]);
      expect([r.path, r.state, st.journal.records]).to.deep.equal(['journal', 'journaling', RECORDS]);
    });

    it('a new session right after the cut replays from the acked prefix, not from where the old one stopped', async function () {
      pair();
      await st.link.sentCount(32);
      const answered = [...st.link.unanswered].slice(0, 3);
      for (const op of answered) st.link.answer(op);   // seqs 1..3 answered before the cut
      expect(r.seq.ackedPrefix).to.equal(3);
      const cutAt = st.link.sent.length;
      st.link.disconnect('cut');
      // Re-paired before the old worker even woke: it must not carry on into this session.
      const first = st.link.next(isWrite);
      pair();
      expect((await first).seq, 'the first record of the new session').to.equal(4);
      const resent = st.link.sent.slice(cutAt).filter(isWrite).map((op) => op.seq);
      expect(resent[0]).to.equal(4);
      expect(resent).to.not.include(33);
    });
  });

  describe('resync', function () {
    it('sends exactly the stale regions from local data, RESYNC-flagged, then hands over the generation', async function () {
      const local = randomBytes(RS);
      await setup({
        size: 8 * RS,
        prepare: async ({ file, bitmap }) => {
          await writeAt(file, RS, local);
          await bitmap.markRegions(1, 1);
          await bitmap.markRegions(3, 1);
        },
      });
      st.peer.data.fill(7, 3 * RS, 4 * RS);   // stale bytes on the peer where a hole is here
      st.peer.data.fill(9, 5 * RS, 6 * RS);   // not marked: not ours to touch
      r.dirty.markedAreStale(false);
      pair();
      await c.worker;
      const writes = st.link.sent.filter(isWrite);
      expect(writes.map((op) => [op.type, op.offset / RS, op.flags & MIRROR_FLAG.RESYNC])).to.deep.equal([
        [MIRROR_OP.WRITE, 1, MIRROR_FLAG.RESYNC],
        [MIRROR_OP.WRITE_ZEROES, 3, MIRROR_FLAG.RESYNC],
      ]);
      expect(st.peer.data.subarray(RS, 2 * RS).equals(local)).to.equal(true);
      expect(st.peer.data.subarray(3 * RS, 4 * RS).every((b) => b === 0)).to.equal(true);
      expect(st.peer.data[5 * RS]).to.equal(9);
      expect(st.link.sent.at(-1)!.type, 'the last request').to.equal(MIRROR_OP.SET_GEN);
      expect([r.state, r.dirty.resyncNeeded.size, st.meta.data.peerBase]).to.deep.equal(['uptodate', 0, st.meta.current]);
    });

    it('an outage mid-resync stops it: nothing is sent after the cut and the regions stay stale', async function () {
      await setup({ size: 256 * RS });
      await st.bitmap.markRegions(0, 256);
      r.dirty.markedAreStale(false);
      st.peer.hold = true;
      pair();
      await st.link.sentCount(10);
      const before = st.link.sent.length;
      st.link.disconnect('cut');
      await c.worker;
      expect(st.link.sent.length).to.equal(before);
      expect(st.link.sentWhileDown).to.deep.equal([]);
      expect(r.state).to.equal('journaling');
      expect(r.dirty.resyncNeeded.size, 'nothing was answered: all still to resend').to.equal(256);
    });
  });

  describe('compare', function () {
    it('compares by hash: a coarse range, then 1 MiB pieces; only the pieces that differ are resent (a hole as a zero)', async function () {
      const data = randomBytes(32 * RS);
      await setup({ size: 64 * RS, prepare: async ({ file }) => { await fs.writeFile(file, data); await fs.truncate(file, 64 * RS); } });
      data.copy(st.peer.data);
      st.peer.data[2 * RS + 17] ^= 1;   // piece 0 (regions 0-15) differs
      st.peer.data[37 * RS] = 0x80;     // piece 2 (regions 32-47, a hole here) differs
      r.dirty.compareNeeded.addRange(0, 64);
      pair();
      await c.worker;
      expect(st.link.sent.filter((op) => op.type === MIRROR_OP.HASH).length, 'one coarse hash, then each 1 MiB piece').to.equal(5);
      expect(st.link.sent.filter(isWrite).map((op) => [op.type, op.offset / RS, op.length / RS])).to.deep.equal([
        [MIRROR_OP.WRITE, 0, 16],
        [MIRROR_OP.WRITE_ZEROES, 32, 16],
      ]);
      expect({ ...r.sync }).to.deep.equal({ compared: 64, equal: 32, equalBytes: 32 * RS });
      expect(st.peer.data.equals(await fs.readFile(st.file))).to.equal(true);
      expect([r.state, r.dirty.compareNeeded.size, r.dirty.compareClears.waiting]).to.deep.equal(['uptodate', 0, 32]);
    });
  });
});
