// Failover and consistency with real sites and real clients: initial sync by region hashes,
// promote / demote, split brain detection and resolution, rollback of an interrupted resync,
// and online verify. Copies are compared byte for byte.
import http from 'node:http';
import fs from 'node:fs/promises';
import { expect } from 'chai';
import { OutagePair } from '../helpers/outage-pair.js';
import { siteStatus, startPair } from '../helpers/pair.js';
import { Cleanup, exec, pollUntil, randomFile, readAt, sha256File, sparseFile, tmpDir, type Site } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const PYTHON = '/usr/bin/python3';

interface Lun {
  name: string; role: string; state: string; reason?: string;
  sync?: { compared: number; equal: number; equalBytes: number };
  mirrored?: { resynced: number; resyncedBytes: number };
  generation?: { current: string; consistent: boolean; splitBrain: unknown };
  undoRegions?: number;
  peer?: string | null;
}

async function lunOf(site: Site, name = 'lun0'): Promise<Lun> {
  const st = await siteStatus(site);
  return st.luns.find((l) => l.name === name) as unknown as Lun;
}

function waitState(site: Site, states: string[], what: string, timeoutMs = 30_000): Promise<Lun> {
  let last: Lun | null = null;
  return pollUntil(async () => {
    last = await lunOf(site);
    return states.includes(last.state) && last;
  }, { timeoutMs }).catch((err: Error) => {
    throw new Error(`${what}: ${err.message}; last lun0 status ${JSON.stringify(last)}`);
  });
}

/** POST an operator action to a site's admin socket (actions are not accepted over TCP). */
function action(site: Site, verb: string, query = ''): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath: site.adminSocket, method: 'POST', path: `/luns/lun0/${verb}${query}` }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', reject);
    req.end();
  });
}

function qemuWrite(uri: string, pattern: number, off: number, len: number) {
  return exec('qemu-io', ['-f', 'raw', '-c', `write -P 0x${pattern.toString(16)} ${off} ${len}`, uri], { timeoutMs: 30_000 });
}

/** Random 64 KiB libnbd writes for `seconds` (the hosts keep writing during a sync). */
function hostWriter(uri: string, seconds: number, size: number) {
  const script = `import sys, nbd, os, random, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    off = random.randrange(0, int(sys.argv[3]) // 65536) * 65536
    h.pwrite(os.urandom(65536), off); n += 1
h.flush(); h.shutdown(); print(n)
`;
  return exec(PYTHON, ['-c', script, uri, String(seconds), String(size)], { timeoutMs: (seconds + 30) * 1000 });
}

describe('mirror: failover and consistency (real sites)', function () {
  this.timeout(180_000);
  const cleanup = new Cleanup();
  let dir: TmpDir;
  beforeEach(async function () {
    dir = await tmpDir('nbd-mirror-failover-');
    cleanup.add('temp dir', () => dir.cleanup());
  });
  // FAILOVER_LOGS=1: print the sites' last log lines and stderr when a test fails.
  const dumps: Site[] = [];
  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && process.env.FAILOVER_LOGS) {
      for (const s of dumps) console.log(`${s.logs.slice(-60).join('\n')}\n--- stderr ---\n${s.stderr.join('\n')}`);
    }
    dumps.length = 0;
    await cleanup.run();
  });

  it('initial sync of a 256 MiB LUN under concurrent writes ends equal; a second pairing of equal LUNs sends almost nothing', async function () {
    const size = 256 * MiB;
    const fileA = await randomFile(dir.join('a.img'), size);
    const fileB = await sparseFile(dir.join('b.img'), size);
    const luns = { a: [{ name: 'lun0', path: fileA, role: 'primary', mirror: 'sync' }], b: [{ name: 'lun0', path: fileB, role: 'secondary', mirror: 'none' }] };
    const first = await startPair({ a: { luns: luns.a }, b: { luns: luns.b } });
    cleanup.add('first pair', () => first.stop());
    dumps.push(first.a, first.b);
    const writes = await hostWriter(first.a.uri('lun0'), 4, size);
    expect(Number(writes.stdout.trim())).to.be.greaterThan(0);
    const done = await waitState(first.a, ['uptodate'], 'initial sync', 120_000);
    expect(done.sync!.compared, 'every region compared').to.equal(size / (64 * 1024));
    expect(done.mirrored!.resyncedBytes, 'the differing regions were sent').to.be.greaterThan(size / 2);
    expect((await lunOf(first.b)).generation!.current).to.equal(done.generation!.current);
    expect(await sha256File(fileB)).to.equal(await sha256File(fileA));
    await first.stop();

    // Two sites that know nothing of each other (fresh dataDirs) but hold equal data.
    const second = await startPair({ a: { luns: luns.a }, b: { luns: luns.b } });
    cleanup.add('second pair', () => second.stop());
    const again = await waitState(second.a, ['uptodate'], 'second pairing', 120_000);
    expect(again.sync!.equalBytes, 'found equal, not sent').to.equal(size);
    expect(again.mirrored!.resyncedBytes, 'bytes sent').to.be.lessThan(MiB);
  });

  it('initial sync skips holes: data and holes end identical on both sides, a punched (TRIMmed) primary range a hole on the secondary', async function () {
    const size = 64 * MiB;
    const fileA = await sparseFile(dir.join('a.img'), size);
    const fileB = await randomFile(dir.join('b.img'), size);   // data everywhere: stale where a has holes
    const data = await fs.readFile(fileB);
    const fa = await fs.open(fileA, 'r+');
    await fa.write(Buffer.from(data.subarray(0, 8 * MiB)).reverse(), 0, 8 * MiB, 0);
    await fa.write(Buffer.from(data.subarray(0, 4 * MiB)).reverse(), 0, 4 * MiB, 40 * MiB);
    await fa.close();
    // What a TRIM leaves in the backing file: a hole punched inside the data.
    await exec('fallocate', ['--punch-hole', '--offset', String(2 * MiB), '--length', String(MiB), fileA]);
    const pair = await startPair({
      a: { luns: [{ name: 'lun0', path: fileA, role: 'primary', mirror: 'sync' }] },
      b: { luns: [{ name: 'lun0', path: fileB, role: 'secondary', mirror: 'none' }] },
    });
    cleanup.add('pair', () => pair.stop());
    dumps.push(pair.a, pair.b);
    const done = await waitState(pair.a, ['uptodate'], 'initial sync', 120_000);
    expect(done.mirrored!.resyncedBytes, 'every range differed (data reversed, holes stale)').to.be.at.least(size - MiB);
    await pair.stop();
    expect(await sha256File(fileB)).to.equal(await sha256File(fileA));
    // The holes of a are holes of b: [2, 3) MiB (punched), [8, 40) and [44, 64) MiB; its data ranges are data.
    const layout = await exec(PYTHON, ['-c', `import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
def has_data(off, n):
    try:
        return os.lseek(fd, off, os.SEEK_DATA) < off + n
    except OSError:
        return False
M = 1 << 20
print([has_data(o * M, n * M) for o, n in ((0, 2), (2, 1), (3, 5), (8, 32), (40, 4), (44, 20))])`, fileB]);
    expect(layout.stdout.trim()).to.equal('[True, False, True, False, True, False]');
  });

  it('promote after losing the primary, write, bring the old primary back, demote it, converge', async function () {
    const pair = await OutagePair.start(dir, { mode: 'sync', size: 32 * MiB });
    cleanup.add('pair', () => pair.stop());
    await waitState(pair.a, ['uptodate'], 'first pairing');
    await qemuWrite(pair.a.uri('lun0'), 0x11, 0, 4 * MiB);
    expect(await action(pair.b, 'promote')).to.have.property('status', 409);   // a is connected and primary

    await pair.kill('a');
    await waitState(pair.b, ['secondary-waiting'], 'b notices a is gone');
    const promoted = await action(pair.b, 'promote');
    expect(promoted.status, JSON.stringify(promoted.body)).to.equal(200);
    expect((await lunOf(pair.b)).role).to.equal('primary');
    await qemuWrite(pair.b.uri('lun0'), 0x22, 2 * MiB, 4 * MiB);   // b's hosts write; a is away

    await pair.restart('a');
    // a still says primary: it must not overwrite b's newer data, nor take it silently.
    const stale = await waitState(pair.a, ['unpaired'], 'old primary refused');
    expect(stale.reason).to.match(/newer|promoted/);
    const demoted = await action(pair.a, 'demote');
    expect(demoted.status, JSON.stringify(demoted.body)).to.equal(200);
    await waitState(pair.b, ['uptodate'], 'new primary caught up the old one', 60_000);
    expect(await sha256File(pair.files.a)).to.equal(await sha256File(pair.files.b));
    expect((await readAt(pair.files.a, 2 * MiB, MiB)).equals(Buffer.alloc(MiB, 0x22))).to.equal(true);
  });

  for (const how of ['--discard-local on the promoted site', '--discard-remote on the promoted site'] as const) {
    it(`a forced split brain is detected on both sites and resolved with ${how}`, async function () {
      const pair = await OutagePair.start(dir, { mode: 'sync', size: 16 * MiB });
      cleanup.add('pair', () => pair.stop());
      dumps.push(pair.a, pair.b);
      await waitState(pair.a, ['uptodate'], 'first pairing');
      pair.cut();
      await waitState(pair.b, ['secondary-waiting'], 'b loses a');
      expect((await action(pair.b, 'promote', '?force=1')).status).to.equal(200);
      await qemuWrite(pair.a.uri('lun0'), 0xaa, 0, MiB);    // both write as primary while apart
      await qemuWrite(pair.b.uri('lun0'), 0xbb, MiB, MiB);
      pair.heal();
      await waitState(pair.a, ['split-brain'], 'a detects the split brain');
      await waitState(pair.b, ['split-brain'], 'b detects the split brain');
      for (const s of [pair.a, pair.b]) expect(s.logs.some((l) => l.includes('split brain'))).to.equal(true);
      // Nothing was merged: each copy has only its own write.
      expect((await readAt(pair.files.b, 0, MiB)).equals(Buffer.alloc(MiB, 0xaa))).to.equal(false);
      expect((await readAt(pair.files.a, MiB, MiB)).equals(Buffer.alloc(MiB, 0xbb))).to.equal(false);

      const survivor = how.startsWith('--discard-local') ? pair.a : pair.b;
      const resolved = how.startsWith('--discard-local') ? await action(pair.b, 'resolve', '?discard=local') : await action(pair.b, 'resolve', '?discard=remote');
      expect(resolved.status, JSON.stringify(resolved.body)).to.equal(200);
      await waitState(survivor, ['uptodate'], 'the survivor re-synced its peer', 60_000);
      const victim = survivor === pair.a ? pair.b : pair.a;
      expect((await lunOf(victim)).role).to.equal('secondary');
      expect(await sha256File(pair.files.a)).to.equal(await sha256File(pair.files.b));
      const kept = survivor === pair.a ? [0, 0xaa] : [MiB, 0xbb];
      expect((await readAt(pair.files.a, kept[0], MiB)).equals(Buffer.alloc(MiB, kept[1])), 'the survivor\'s write is on both').to.equal(true);
    });
  }

  it('an initial sync resumes where it was after the primary restarts, and after the secondary restarts', async function () {
    const size = 32 * MiB;
    const regions = size / (64 * 1024);
    // Both copies start equal (the same data: holes compare at no rate cost); at 4 MiB/s the comparison takes about 8 s.
    const pair = await OutagePair.start(dir, { mode: 'sync', size, sameData: true, mirrorA: { syncRateBytes: 4 * MiB } });
    cleanup.add('pair', () => pair.stop());
    dumps.push(pair.a, pair.b);
    await pollUntil(async () => { const l = await lunOf(pair.a); return l.state === 'syncing' && (l.sync?.compared ?? 0) >= regions / 4 && l; }, { timeoutMs: 30_000 });
    await pair.kill('a');
    await pair.restart('a');
    const l = await pollUntil(async () => { const x = await lunOf(pair.a); return x.state === 'syncing' && (x.sync?.compared ?? 0) > 0 && x; }, { timeoutMs: 30_000 });
    const total = (l as unknown as { progress: { syncTotal: number } }).progress.syncTotal;
    expect(total, 'only the regions not compared before the restart are left').to.be.lessThan(regions);
    await pair.kill('b');
    await pair.restart('b');
    const done = await waitState(pair.a, ['uptodate'], 'the sync finished', 60_000);
    expect(done.sync!.compared, 'regions compared by the restarted primary').to.be.at.most(total);
    expect(await sha256File(pair.files.b)).to.equal(await sha256File(pair.files.a));
  });

  it('a new secondary killed half-way through its initial sync says it was never consistent; a later sync completes it', async function () {
    const size = 32 * MiB;
    // Data on a, none on b (a new secondary); at 8 MiB/s the sync takes about 4 s.
    const pair = await OutagePair.start(dir, { mode: 'sync', size, dataOnA: true, mirrorA: { syncRateBytes: 8 * MiB } });
    cleanup.add('pair', () => pair.stop());
    dumps.push(pair.a, pair.b);
    await pollUntil(async () => {
      const l = await lunOf(pair.a);
      return (l.state === 'resyncing' || l.state === 'syncing') && (l.mirrored?.resyncedBytes ?? 0) > 0 && l;
    }, { timeoutMs: 30_000 });
    await pair.kill('b');
    await pair.restart('b');
    const b = await lunOf(pair.b);
    expect(b.state, 'not a consistent copy').to.be.oneOf(['secondary-syncing', 'secondary-inconsistent']);
    expect(b.reason).to.match(/never synced/);
    await waitState(pair.a, ['uptodate'], 'the sync finished', 60_000);
    const after = await lunOf(pair.b);
    expect([after.state, after.reason]).to.deep.equal(['secondary-uptodate', undefined]);
    expect(await sha256File(pair.files.b)).to.equal(await sha256File(pair.files.a));
  });

  it('a resync interrupted half-way is rolled back on promote to an earlier state of the primary', async function () {
    // The first pairing compares 32 MiB; the resync after the outage is slowed down to 4 MiB/s.
    const pair = await OutagePair.start(dir, { mode: 'sync', size: 32 * MiB, mirrorA: { journal: { maxBytes: MiB }, syncRateBytes: 4 * MiB } });
    cleanup.add('pair', () => pair.stop());
    dumps.push(pair.a, pair.b);
    await waitState(pair.a, ['uptodate'], 'first pairing', 60_000);
    await qemuWrite(pair.a.uri('lun0'), 0x31, 0, 8 * MiB);
    pair.cut();
    await waitState(pair.b, ['secondary-waiting'], 'b loses a');
    const earlier = await fs.readFile(pair.files.b);   // b is a copy of an earlier state of a
    expect(earlier.subarray(0, 8 * MiB).equals(Buffer.alloc(8 * MiB, 0x31))).to.equal(true);
    // 16 MiB of changes overflow the 1 MiB journal: a bitmap resync (2 MiB/s) follows the heal.
    await exec(PYTHON, ['-c', 'import sys,nbd,os\nh=nbd.NBD();h.connect_uri(sys.argv[1])\nfor i in range(256): h.pwrite(os.urandom(65536), 4*1048576+i*65536)\nh.flush();h.shutdown()', pair.a.uri('lun0')], { timeoutMs: 30_000 });
    pair.heal();
    // (A resync request is a 1 MiB run: its regions are saved before it lands, so also wait for b to change.)
    await pollUntil(async () => {
      const l = await lunOf(pair.b);
      return l.state === 'secondary-syncing' && (l.undoRegions ?? 0) >= 16 && !(await fs.readFile(pair.files.b)).equals(earlier) && l;
    }, { timeoutMs: 30_000 });
    pair.cut();   // half-way
    await waitState(pair.b, ['secondary-inconsistent'], 'b is inconsistent after the cut');
    expect((await fs.readFile(pair.files.b)).equals(earlier), 'the resync changed b').to.equal(false);
    const promoted = await action(pair.b, 'promote');
    expect(promoted.status, JSON.stringify(promoted.body)).to.equal(200);
    expect(JSON.stringify(promoted.body)).to.include('rolled back');
    expect((await fs.readFile(pair.files.b)).equals(earlier), 'b equals the earlier state of a').to.equal(true);
  });

  it('verify finds a region corrupted in the secondary\'s backing file and --repair fixes it', async function () {
    const fileA = await randomFile(dir.join('a.img'), 32 * MiB);
    const fileB = dir.join('b.img');
    await fs.copyFile(fileA, fileB);
    const p = await startPair({
      a: { luns: [{ name: 'lun0', path: fileA, role: 'primary', mirror: 'sync' }] },
      b: { luns: [{ name: 'lun0', path: fileB, role: 'secondary', mirror: 'none' }] },
    });
    cleanup.add('pair', () => p.stop());
    await waitState(p.a, ['uptodate'], 'pairing');
    const clean = await action(p.a, 'verify');
    expect(clean.body.differing).to.deep.equal([]);
    const fh = await fs.open(fileB, 'r+');
    await fh.write(Buffer.alloc(4096, 0xee), 0, 4096, 5 * MiB + 8192);   // behind the site's back
    await fh.close();
    const found = await action(p.a, 'verify');
    expect(found.status).to.equal(200);
    expect(found.body.differing).to.deep.equal([{ offset: 5 * MiB, length: 64 * 1024 }]);
    expect(await sha256File(fileB)).to.not.equal(await sha256File(fileA));
    const repaired = await action(p.a, 'verify', '?repair=1');
    expect(repaired.body.repaired).to.equal(1);
    expect(await sha256File(fileB)).to.equal(await sha256File(fileA));
    expect((await action(p.a, 'verify')).body.differing).to.deep.equal([]);
    // The repair ends with the secondary consistent and its undo log dropped (issue 18.2): a later
    // promote must not "roll back" the repaired region to its corrupt contents.
    const b = await pollUntil(async () => {
      const l = await lunOf(p.b) as Lun & { generation?: { consistent: boolean } };
      return l.state === 'secondary-uptodate' && l.generation?.consistent === true && (l.undoRegions ?? 0) === 0 && l;
    }, { timeoutMs: 30_000 });
    expect(b, 'b consistent after the repair').to.not.equal(false);
    // An unrelated reload (a second mirrored LUN added on a renegotiates the whole session) re-pairs
    // lun0: the repaired copy must pair as up to date, with no compare and no resync.
    const comparedBefore = (await lunOf(p.a)).sync?.compared ?? 0;
    const fileA1 = await sparseFile(dir.join('a1.img'), 4 * MiB);
    const from = p.a.logs.length;
    await fs.writeFile(p.a.configPath, JSON.stringify({ ...p.a.config, luns: [...p.a.config.luns, { name: 'lun1', path: fileA1, role: 'primary', mirror: 'sync' }] }, null, 2));
    p.a.proc.kill('SIGHUP');
    await pollUntil(() => p.a.logs.slice(from).some((l) => l.includes('"message":"mirror link up"')), { timeoutMs: 20_000, intervalMs: 20, what: 'a renegotiated after the reload' });
    const again = await waitState(p.a, ['uptodate'], 'lun0 up to date after the reload');
    const lun0States = p.a.logs.slice(from).filter((l) => l.includes('"message":"LUN mirror state"') && l.includes('"lun":"lun0"'));
    expect(p.a.logs.slice(from).some((l) => l.includes('"message":"reloaded"')), 'a reloaded').to.equal(true);
    expect(lun0States.filter((l) => /"to":"(syncing|resyncing)"/.test(l)), 'lun0 compared or resynced after the reload').to.deep.equal([]);
    expect(again.sync?.compared ?? 0, 'regions compared after the reload').to.equal(comparedBefore);
    const promoted = await action(p.b, 'promote', '?force=1');
    expect(promoted.status, JSON.stringify(promoted.body)).to.equal(200);
    expect(JSON.stringify(promoted.body)).to.not.include('rolled back');
    expect(await sha256File(fileB), 'the promoted copy equals the primary').to.equal(await sha256File(fileA));
  });
});
