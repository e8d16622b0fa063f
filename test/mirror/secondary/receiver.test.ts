// The receiving side of the mirror, driven over the wire by a hand-rolled pool connection
// (test/helpers/mirror-client.ts) against a real site holding secondary LUNs: apply order by
// dep, duplicate suppression, what a new run of the primary may (not) inherit, and the
// generation ids (v2): how a resync leaves the copy inconsistent until SET_GEN, and how the
// next pairing follows from the generation adopted.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { lunStatus, type LunStatus } from '../../helpers/pair.js';
import { MirrorClient } from '../../helpers/mirror-client.js';
import { Cleanup, freePorts, readAt, sparseFile, startSite, tmpDir, type Site } from '../../helpers/site.js';
import type { TmpDir } from '../../helpers/tmp.js';
import { NO_GENERATION } from '../../../src/persist/lun-meta.js';
import { encodeGeneration, MIRROR_FLAG, MIRROR_OP, OFFER_FLAG, PAIR, SYNC, type Lineage, type LunAnswer, type LunOffer } from '../../../src/mirror/wire.js';

const MiB = 1024 * 1024;
const LUNS = ['order', 'dup', 'rerun', 'rerun-open', 'gen', 'split'];

/** The part of a secondary's status this file reads beyond LunStatus. */
type GenStatus = LunStatus & {
  generation: { current: string; history: string[]; consistent: boolean; localChanges: boolean; splitBrain: { peerCurrent: string } | null };
  pairing: { sync: 'incremental' | 'full'; reason: string } | null;
  undoRegions: number;
};
const genStatus = async (site: Site, name: string) => (await lunStatus(site, name)) as GenStatus;
const newGen = () => crypto.randomBytes(8).toString('hex');

function fill(len: number, byte: number): Buffer {
  return Buffer.alloc(len, byte);
}

/** A primary that has not caught this secondary up yet: its own generation, no peer base. */
function offer(name: string, instance: Buffer, nextSeq = 1, lineage: Lineage = { current: newGen(), history: [], peerBase: '' }, flags = 0): LunOffer {
  return { id: 0, name, size: MiB, instance, nextSeq, lineage, flags };
}

/** Track whether a promise settled, without awaiting it. */
function tracked<T>(p: Promise<T>): { p: Promise<T>; settled: boolean } {
  const t = { p, settled: false };
  p.then(() => { t.settled = true; }, () => { t.settled = true; });
  return t;
}

describe('mirror receiver (hand-rolled pool connections against a real site)', function () {
  this.timeout(30_000);
  const cleanup = new Cleanup();
  let dir: TmpDir;
  let site: Site;
  let mirPort: number;
  const files: Record<string, string> = {};
  const clients: MirrorClient[] = [];

  async function connect(name: string, instance: Buffer, session?: Buffer, nextSeq = 1): Promise<MirrorClient> {
    const { client, answer } = await MirrorClient.connect(mirPort, 'a', [offer(name, instance, nextSeq)], session);
    clients.push(client);
    expect(answer.site).to.equal('b');
    // A secondary with no generation yet pairs with any primary, comparing everything.
    // `copy` names this secondary's copy (one id per LUN, for as long as its metadata lives).
    expect(answer.answers.map((a) => ({ ...a, copy: /^[0-9a-f]{16}$/.test(a.copy) && a.copy !== NO_GENERATION })))
      .to.deep.equal([{ id: 0, status: PAIR.OK, size: MiB, sync: SYNC.FULL, current: NO_GENERATION, applied: nextSeq - 1, copy: true }]);
    return client;
  }

  /** Offer `name` with `lineage`; the answer (the client is kept for afterEach to close). */
  async function offerLineage(name: string, lineage: Lineage, flags = 0): Promise<{ client: MirrorClient; answer: LunAnswer }> {
    const { client, answer } = await MirrorClient.connect(mirPort, 'a', [offer(name, crypto.randomBytes(8), 1, lineage, flags)]);
    clients.push(client);
    expect(answer.answers).to.have.length(1);
    return { client, answer: answer.answers[0] };
  }

  before(async function () {
    dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    for (const n of LUNS) files[n] = await sparseFile(dir.join(`${n}.img`), MiB);
    const [nbd, adm, mir, unused] = await freePorts(4);
    mirPort = mir;
    site = await startSite({
      site: 'b', listen: { host: '127.0.0.1', port: nbd }, admin: { host: '127.0.0.1', port: adm },
      // The peer port is never listened on: b has no primary, so it never connects anyway.
      mirror: { listen: { host: '127.0.0.1', port: mir }, peer: { host: '127.0.0.1', port: unused, site: 'a' }, connections: 2 },
      luns: LUNS.map((name) => ({ name, path: files[name], role: 'secondary', mirror: 'none' })),
    });
    cleanup.add('stop site', () => site.stop());
  });

  afterEach(async function () {
    await Promise.all(clients.splice(0).map((c) => c.close()));
  });

  after(() => cleanup.run());

  it('applies a request only once its dep is applied, even when it arrives first on another connection', async function () {
    const instance = crypto.randomBytes(8);
    const session = crypto.randomBytes(8);
    const c1 = await connect('order', instance, session);
    const c2 = await connect('order', instance, session);

    // seq 2 depends on seq 1, which has not been sent yet.
    const second = tracked(c1.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 2, dep: 1, offset: 0, length: 4096, payload: fill(4096, 0xaa) }));
    // A FLUSH behind it on the same connection: once its reply is here, seq 2 has been read.
    expect(await c1.request({ type: MIRROR_OP.FLUSH, lunId: 0, seq: 0, dep: 0, offset: 0, length: 0 })).to.equal(0);
    expect(second.settled, 'seq 2 answered before seq 1 arrived').to.equal(false);
    expect((await readAt(files.order, 0, 4096)).every((x) => x === 0), 'seq 2 applied before seq 1').to.equal(true);

    expect(await c2.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 1, dep: 0, offset: 0, length: 8192, payload: fill(8192, 0xbb) })).to.equal(0);
    expect(await second.p).to.equal(0);
    const data = await readAt(files.order, 0, 8192);
    expect(data.subarray(0, 4096).every((x) => x === 0xaa), 'the later write (seq 2) wins').to.equal(true);
    expect(data.subarray(4096).every((x) => x === 0xbb)).to.equal(true);
    const st = await lunStatus(site, 'order');
    expect(st.appliedSeq).to.equal(2);
    // Fed but never synced (no SET_GEN yet): no state of the primary, so not uptodate (issue 19.2).
    expect(st.state).to.equal('secondary-syncing');
  });

  it('acknowledges a sequence number it already applied without applying it again', async function () {
    const c = await connect('dup', crypto.randomBytes(8));
    expect(await c.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 1, dep: 0, offset: 100, length: 1000, payload: fill(1000, 0x11) })).to.equal(0);
    expect(await c.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 1, dep: 0, offset: 100, length: 1000, payload: fill(1000, 0x22) })).to.equal(0);
    expect(await c.request({ type: MIRROR_OP.FLUSH, lunId: 0, seq: 0, dep: 0, offset: 0, length: 0 })).to.equal(0);
    expect((await readAt(files.dup, 100, 1000)).every((x) => x === 0x11), 'the duplicate was applied').to.equal(true);
    const st = await lunStatus(site, 'dup');
    expect(st.appliedSeq).to.equal(1);
    expect(st.applied!.ops).to.equal(1);
  });

  /**
   * Run 1 of the primary sent seq 2 (dep 1), but seq 1 never arrived (the primary crashed
   * mid-send). Then run 2 (a new instance, numbering from 1 again) writes seq 1 and seq 2.
   * Neither the stale seq 2 of run 1 may land, nor may run 2's seq 2 be taken for it.
   */
  async function newRunAfterStaleWaiter(lun: string, closeOld: boolean): Promise<void> {
    const old = await connect(lun, crypto.randomBytes(8));
    void old.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 2, dep: 1, offset: 0, length: 4096, payload: fill(4096, 0xaa) })
      .catch(() => undefined);   // never answered
    expect(await old.request({ type: MIRROR_OP.FLUSH, lunId: 0, seq: 0, dep: 0, offset: 0, length: 0 })).to.equal(0);
    if (closeOld) await old.close();

    const c = await connect(lun, crypto.randomBytes(8));
    expect(await c.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 1, dep: 0, offset: 0, length: 4096, payload: fill(4096, 0xbb) })).to.equal(0);
    expect(await c.request({ type: MIRROR_OP.FLUSH, lunId: 0, seq: 0, dep: 0, offset: 0, length: 0 })).to.equal(0);
    expect(await c.request({ type: MIRROR_OP.WRITE, lunId: 0, seq: 2, dep: 1, offset: 8192, length: 4096, payload: fill(4096, 0xcc) })).to.equal(0);
    expect(await c.request({ type: MIRROR_OP.FLUSH, lunId: 0, seq: 0, dep: 0, offset: 0, length: 0 })).to.equal(0);

    const first = await readAt(files[lun], 0, 4096);
    const second = await readAt(files[lun], 8192, 4096);
    expect({
      'offset 0 (run 2 seq 1 wrote 0xbb)': first.every((x) => x === 0xbb) ? 'bb' : first.every((x) => x === 0xaa) ? 'aa (stale write of run 1)' : 'other',
      'offset 8192 (run 2 seq 2 wrote 0xcc)': second.every((x) => x === 0xcc) ? 'cc' : second.every((x) => x === 0) ? '00 (acknowledged, not applied)' : 'other',
    }).to.deep.equal({ 'offset 0 (run 2 seq 1 wrote 0xbb)': 'bb', 'offset 8192 (run 2 seq 2 wrote 0xcc)': 'cc' });
  }

  it('a waiting write of a previous run of the primary (connection closed) is never applied in the new run', async function () {
    await newRunAfterStaleWaiter('rerun', true);
  });

  it('a waiting write of a previous run of the primary (connection still open, e.g. half-open after a crash) is never applied in the new run', async function () {
    await newRunAfterStaleWaiter('rerun-open', false);
  });

  it('a resync write makes the copy inconsistent until SET_GEN, which adopts the primary\'s generation; the next pairing is incremental', async function () {
    const before = await genStatus(site, 'gen');
    // A copy that never completed an initial sync is no state of the primary (issue 19.2).
    expect(before.generation).to.include({ current: NO_GENERATION, consistent: false, neverSynced: true, localChanges: false });
    const c = await connect('gen', crypto.randomBytes(8));
    expect((await genStatus(site, 'gen')).pairing).to.include({ sync: 'full' });

    // A write of the initial sync (RESYNC): persisted as inconsistent before it lands, the old
    // contents kept in the undo log.
    expect(await c.request({ type: MIRROR_OP.WRITE, flags: MIRROR_FLAG.RESYNC, lunId: 0, seq: 1, dep: 0, offset: 0, length: 4096, payload: fill(4096, 0x77) })).to.equal(0);
    let st = await genStatus(site, 'gen');
    expect(st.generation.consistent, 'consistent during a resync').to.equal(false);
    expect(st.state).to.equal('secondary-syncing');
    // A never-synced copy has no consistent state to keep: no undo log (issue 13).
    expect(st.undoRegions, 'no undo log for a never-synced copy').to.equal(0);

    // A malformed SET_GEN is refused and changes nothing.
    const bad = Buffer.alloc(12, 0x33);
    expect(await c.request({ type: MIRROR_OP.SET_GEN, lunId: 0, seq: 0, dep: 1, offset: 0, length: bad.length, payload: bad })).to.equal(22);
    expect((await genStatus(site, 'gen')).generation).to.include({ current: NO_GENERATION, consistent: false });

    // The primary caught us up: SET_GEN (after seq 1) with its generation and history.
    const g = newGen();
    const history = [newGen(), newGen()];
    const payload = encodeGeneration(g, history);
    expect(await c.request({ type: MIRROR_OP.SET_GEN, lunId: 0, seq: 0, dep: 1, offset: 0, length: payload.length, payload })).to.equal(0);
    st = await genStatus(site, 'gen');
    expect(st.generation).to.include({ current: g, consistent: true, localChanges: false });
    expect(st.generation.history).to.deep.equal(history);
    expect(st.state).to.equal('secondary-uptodate');
    expect(st.undoRegions, 'the undo log is dropped once consistent').to.equal(0);
    expect((await readAt(files.gen, 0, 4096)).every((x) => x === 0x77)).to.equal(true);
    await c.close();

    // The primary's next run: its journal is relative to g (peerBase): incremental.
    const next = newGen();
    const { answer } = await offerLineage('gen', { current: next, history: [g, ...history], peerBase: g });
    expect({ ...answer, copy: '' }).to.deep.equal({ id: 0, status: PAIR.OK, size: MiB, sync: SYNC.INCREMENTAL, current: g, applied: 0, copy: '' });
    expect((await genStatus(site, 'gen')).pairing).to.include({ sync: 'incremental' });
  });

  it('an unrelated primary is a split brain: recorded, refused until a forced offer overwrites the copy', async function () {
    const c = await connect('split', crypto.randomBytes(8));
    const g = newGen();
    const payload = encodeGeneration(g, []);
    expect(await c.request({ type: MIRROR_OP.SET_GEN, lunId: 0, seq: 0, dep: 0, offset: 0, length: payload.length, payload })).to.equal(0);
    await c.close();

    // A primary whose lineage neither contains g nor is contained in ours: both wrote apart.
    const stranger = newGen();
    let { answer } = await offerLineage('split', { current: stranger, history: [newGen()], peerBase: '' });
    expect(answer).to.include({ status: PAIR.SPLIT_BRAIN, current: g });
    let st = await genStatus(site, 'split');
    expect(st.state).to.equal('split-brain');
    expect(st.generation.splitBrain).to.include({ peerCurrent: stranger });
    // Even a primary that descends from g is refused now: the split brain stands until resolved.
    ({ answer } = await offerLineage('split', { current: newGen(), history: [g], peerBase: g }));
    expect(answer.status).to.equal(PAIR.SPLIT_BRAIN);
    // A forced offer (`resolve --discard-remote` on the peer) pairs, FULL; our copy counts as changed.
    ({ answer } = await offerLineage('split', { current: stranger, history: [], peerBase: '' }, OFFER_FLAG.FORCE));
    expect({ ...answer, copy: '' }).to.deep.equal({ id: 0, status: PAIR.OK, size: MiB, sync: SYNC.FULL, current: g, applied: 0, copy: '' });
    st = await genStatus(site, 'split');
    expect(st.generation).to.include({ splitBrain: null, localChanges: true });
    expect(st.state).to.equal('secondary-uptodate');
  });
});
