// The receiving side of the mirror, driven over the wire by a hand-rolled pool connection
// (test/helpers/mirror-client.ts) against a real site holding secondary LUNs: apply order by
// dep, duplicate suppression, and what a new run of the primary may (not) inherit.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { lunStatus } from '../helpers/pair.js';
import { MirrorClient } from '../helpers/mirror-client.js';
import { Cleanup, freePorts, readAt, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';
import { MIRROR_OP, PAIR, type LunOffer } from '../../src/mirror/wire.js';

const MiB = 1024 * 1024;
const LUNS = ['order', 'dup', 'rerun', 'rerun-open'];

function fill(len: number, byte: number): Buffer {
  return Buffer.alloc(len, byte);
}

function offer(name: string, instance: Buffer, nextSeq = 1): LunOffer {
  return { id: 0, name, size: MiB, instance, nextSeq };
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
    expect(answer.answers).to.deep.equal([{ id: 0, status: PAIR.OK, size: MiB }]);
    return client;
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
    expect(st.state).to.equal('secondary-uptodate');
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
});
