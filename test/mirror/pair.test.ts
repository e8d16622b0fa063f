// Two real sites mirroring each other over a pool of TCP connections, driven by real NBD
// clients (nbdcopy, qemu-io, nbdinfo, libnbd python). Copies are compared byte for byte
// (sha256 of the backing files) against each other and against what the clients wrote.
import { expect } from 'chai';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { lunStatus, siteStatus, startPair, waitDrained, waitLunStates, type Pair } from '../helpers/pair.js';
import { Cleanup, exec, pollUntil, randomFile, readAt, sha256File, sparseFile, tmpDir } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const HERE = path.dirname(fileURLToPath(import.meta.url));
const OVERLAP_SCRIPT = path.join(HERE, 'overlap-writes.py');
// python3-libnbd is a Debian package: use the system interpreter, not whatever is first on PATH.
const PYTHON = '/usr/bin/python3';

interface OverlapResult { writes: number; bytes: number; flushes: number; seed: number; size: number }

/** Run overlap-writes.py against `uri`; resolves with its JSON summary. */
async function overlapWrites(uri: string, writes = 4000): Promise<OverlapResult> {
  const r = await exec(PYTHON, [OVERLAP_SCRIPT, uri, '--handles', '4', '--inflight', '32', '--writes', String(writes),
    '--region', String(MiB), '--max-len', String(64 * 1024)], { timeoutMs: 60_000 });
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as OverlapResult;
}

/** qemu-io write of `len` bytes of byte `pattern` at `off`. */
function qemuWrite(uri: string, pattern: number, off: number, len: number) {
  return exec('qemu-io', ['-f', 'raw', '-c', `write -P 0x${pattern.toString(16)} ${off} ${len}`, uri], { timeoutMs: 30_000 });
}

/** Connect to `uri` with libnbd (python) as `h`, run `code`, disconnect (no FLUSH). */
function libnbd(uri: string, code: string) {
  const script = `import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n${code}\nh.shutdown()\n`;
  return exec(PYTHON, ['-c', script, uri], { timeoutMs: 30_000 });
}

async function nbdinfoReadOnly(uri: string): Promise<boolean> {
  const r = await exec('nbdinfo', ['--json', uri], { timeoutMs: 30_000 });
  const info = JSON.parse(r.stdout) as { exports: { is_read_only: boolean }[] };
  expect(info.exports).to.have.length(1);
  return info.exports[0].is_read_only;
}

async function fileSize(file: string): Promise<number> {
  return (await fs.stat(file)).size;
}

/**
 * Try host writes on `uri` with libnbd's client-side checks off, so the server has to refuse
 * them itself. Prints the errno name (or "ok") of pwrite, zero and trim, one per line.
 */
const TRY_WRITES = `
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
def attempt(name, fn):
    try:
        fn()
        print(name, 'ok')
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, str(e.errno)))
attempt('pwrite', lambda: h.pwrite(b'\\x5a' * 4096, 0))
attempt('pwrite-unaligned', lambda: h.pwrite(b'\\xa5' * 777, 12345))
attempt('zero', lambda: h.zero(65536, 0))
attempt('trim', lambda: h.trim(65536, 0))
h.shutdown()
`;

describe('mirror pair (two sites, real clients)', function () {
  this.timeout(60_000);

  describe('sync both directions (a:lun0 -> b, b:lun1 -> a), 4 connections', function () {
    const SIZE = 64 * MiB;
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let pair: Pair;
    const files = { a0: '', a1: '', b0: '', b1: '', src0: '', src1: '' };

    before(async function () {
      dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      files.a0 = await sparseFile(dir.join('a-lun0.img'), SIZE);
      files.a1 = await sparseFile(dir.join('a-lun1.img'), SIZE);
      files.b0 = await sparseFile(dir.join('b-lun0.img'), SIZE);
      files.b1 = await sparseFile(dir.join('b-lun1.img'), SIZE);
      files.src0 = await randomFile(dir.join('src0.img'), SIZE);
      files.src1 = await randomFile(dir.join('src1.img'), SIZE);
      pair = await startPair({
        a: { luns: [
          { name: 'lun0', path: files.a0, role: 'primary', mirror: 'sync' },
          { name: 'lun1', path: files.a1, role: 'secondary', mirror: 'none' },
        ] },
        b: { luns: [
          { name: 'lun0', path: files.b0, role: 'secondary', mirror: 'none' },
          { name: 'lun1', path: files.b1, role: 'primary', mirror: 'sync' },
        ] },
        connections: 4,
      });
      cleanup.add('stop pair', () => pair.stop());
      await waitLunStates(pair.a, { lun0: 'uptodate', lun1: 'secondary-uptodate' });
      await waitLunStates(pair.b, { lun1: 'uptodate', lun0: 'secondary-uptodate' });
    });

    after(() => cleanup.run());

    it('"mirror LUN paired" is logged once per LUN, not once per pool connection (4 connections)', async function () {
      for (const [site, lun] of [[pair.b, 'lun0'], [pair.a, 'lun1']] as const) {
        const st = await siteStatus(pair.a === site ? pair.b : pair.a);
        expect(st.mirror!.connections.filter((c) => c.status === 'up'), 'the feeding pool').to.have.length(4);
        const paired = site.logs.filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { message: string; lun?: string })
          .filter((l) => l.message === 'mirror LUN paired');
        expect(paired.map((l) => l.lun), `"mirror LUN paired" lines on ${site.config.site}`).to.deep.equal([lun]);
      }
    });

    it('nbdcopy 64 MiB into both primaries at once: primary == secondary == source right after each copy', async function () {
      const [srcHash0, srcHash1] = await Promise.all([sha256File(files.src0), sha256File(files.src1)]);
      expect(srcHash0).to.not.equal(await sha256File(files.a0));   // the copy has something to do
      // Hash each pair the moment its nbdcopy returns (the other copy may still be running).
      const copy = async (src: string, uri: string, primary: string, secondary: string) => {
        await exec('nbdcopy', [src, uri], { timeoutMs: 60_000 });
        const [p, s] = await Promise.all([sha256File(primary), sha256File(secondary)]);
        return { p, s };
      };
      const [r0, r1] = await Promise.all([
        copy(files.src0, pair.a.uri('lun0'), files.a0, files.b0),
        copy(files.src1, pair.b.uri('lun1'), files.b1, files.a1),
      ]);
      expect(r0.p, 'a:lun0 (primary) == source').to.equal(srcHash0);
      expect(r0.s, 'b:lun0 (secondary) == source').to.equal(srcHash0);
      expect(r1.p, 'b:lun1 (primary) == source').to.equal(srcHash1);
      expect(r1.s, 'a:lun1 (secondary) == source').to.equal(srcHash1);
      for (const f of [files.a0, files.a1, files.b0, files.b1]) expect(await fileSize(f), f).to.equal(SIZE);

      const a0 = await lunStatus(pair.a, 'lun0');
      const b1 = await lunStatus(pair.b, 'lun1');
      for (const l of [a0, b1]) {
        expect(l.state, `${l.name} state`).to.equal('uptodate');
        expect(l.mirrored!.bytes, `${l.name} mirrored bytes`).to.equal(SIZE);
        expect(l.mirrored!.failures).to.equal(0);
        expect(l.inflight).to.equal(0);
      }
    });

    it('thousands of overlapping unaligned writes over 4 connections (sync): primary == secondary', async function () {
      const before = await lunStatus(pair.a, 'lun0');
      const hashBefore = await sha256File(files.a0);
      const res = await overlapWrites(pair.a.uri('lun0'));
      expect(res.writes).to.equal(4000);

      const [p, s] = await Promise.all([sha256File(files.a0), sha256File(files.b0)]);
      expect(p, 'the writes changed the primary').to.not.equal(hashBefore);
      expect(s, `b:lun0 (secondary) == a:lun0 (primary), python seed ${res.seed}`).to.equal(p);
      expect(await fileSize(files.b0)).to.equal(SIZE);

      const after = await lunStatus(pair.a, 'lun0');
      expect(after.state).to.equal('uptodate');
      expect(after.mirrored!.ops - before.mirrored!.ops, 'one mirror request per host write').to.equal(4000);
      expect(after.mirrored!.bytes - before.mirrored!.bytes).to.equal(res.bytes);
      expect(after.mirrored!.failures).to.equal(0);
      expect(after.inflight).to.equal(0);
      const sec = await lunStatus(pair.b, 'lun0');
      expect(sec.appliedSeq, 'secondary applied every sequence number').to.equal(after.mirrored!.ops);
      expect(sec.applied!.errors).to.equal(0);
    });

    it('a host write to a secondary gets EPERM and leaves its backing file unchanged; nbdinfo says read-only', async function () {
      const before = await Promise.all([sha256File(files.b0), sha256File(files.a1)]);
      for (const [site, lun] of [[pair.b, 'lun0'], [pair.a, 'lun1']] as const) {
        const r = await exec(PYTHON, ['-c', TRY_WRITES, site.uri(lun)], { timeoutMs: 30_000 });
        const lines = r.stdout.trim().split('\n');
        expect(lines, `${site.config.site}:${lun}`).to.deep.equal(['pwrite EPERM', 'pwrite-unaligned EPERM', 'zero EPERM', 'trim EPERM']);
        expect(await nbdinfoReadOnly(site.uri(lun)), `${site.config.site}:${lun} is_read_only`).to.equal(true);
      }
      // qemu refuses to open a read-only export for writing at all.
      const q = await exec('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 4096', pair.b.uri('lun0')], { allowFail: true, timeoutMs: 30_000 });
      expect(q.code).to.not.equal(0);
      expect(q.stderr + q.stdout).to.match(/Permission denied|Operation not permitted|read-only/i);

      expect(await Promise.all([sha256File(files.b0), sha256File(files.a1)])).to.deep.equal(before);
      expect(await nbdinfoReadOnly(pair.a.uri('lun0')), 'the primary is writable').to.equal(false);
      const sec = await lunStatus(pair.b, 'lun0');
      expect(sec.readOnly).to.equal(true);
      expect(sec.state).to.equal('secondary-uptodate');
    });
  });

  describe('async b:lun1 -> a, sync a:lun0 -> b, 3 connections', function () {
    const SIZE = 32 * MiB;
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let pair: Pair;
    const files = { a0: '', a1: '', b0: '', b1: '' };

    before(async function () {
      dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      files.a0 = await sparseFile(dir.join('a-lun0.img'), SIZE);
      files.a1 = await sparseFile(dir.join('a-lun1.img'), SIZE);
      files.b0 = await sparseFile(dir.join('b-lun0.img'), SIZE);
      files.b1 = await sparseFile(dir.join('b-lun1.img'), SIZE);
      pair = await startPair({
        a: { luns: [
          { name: 'lun0', path: files.a0, role: 'primary', mirror: 'sync' },
          { name: 'lun1', path: files.a1, role: 'secondary', mirror: 'none' },
        ] },
        b: {
          luns: [
            { name: 'lun0', path: files.b0, role: 'secondary', mirror: 'none' },
            { name: 'lun1', path: files.b1, role: 'primary', mirror: 'async' },
          ],
          // A small window, so the async back-pressure is exercised too.
          mirror: { asyncWindowBytes: MiB },
        },
        connections: 3,
      });
      cleanup.add('stop pair', () => pair.stop());
      await waitLunStates(pair.a, { lun0: 'uptodate', lun1: 'secondary-uptodate' });
      await waitLunStates(pair.b, { lun1: 'uptodate', lun0: 'secondary-uptodate' });
    });

    after(() => cleanup.run());

    it('the connection array has 3 connections, all up, visible to ss', async function () {
      for (const site of [pair.a, pair.b]) {
        const st = await siteStatus(site);
        expect(st.mirror, `site ${st.site} mirror status`).to.not.equal(null);
        expect(st.mirror!.link).to.equal('up');
        expect(st.mirror!.connections.map((c) => c.index)).to.deep.equal([0, 1, 2]);
        expect(st.mirror!.connections.map((c) => c.status)).to.deep.equal(['up', 'up', 'up']);
      }
      const r = await exec('ss', ['-tn', 'state', 'established'], { timeoutMs: 10_000 });
      // With a state filter ss prints: Recv-Q Send-Q Local-Address:Port Peer-Address:Port [Process]
      const rows = r.stdout.split('\n').slice(1).map((l) => l.trim().split(/\s+/)).filter((c) => c.length >= 4);
      const count = (col: number, addr: string) => rows.filter((c) => c[col] === addr).length;
      expect(count(3, `127.0.0.1:${pair.mirB}`), "a's pool connections to b's mirror port").to.equal(3);
      expect(count(2, `127.0.0.1:${pair.mirB}`), "b's accepted mirror connections").to.equal(3);
      expect(count(3, `127.0.0.1:${pair.mirA}`), "b's pool connections to a's mirror port").to.equal(3);
      expect(count(2, `127.0.0.1:${pair.mirA}`), "a's accepted mirror connections").to.equal(3);
    });

    it('thousands of overlapping unaligned writes over 4 connections (async): after flush, primary == secondary', async function () {
      const before = await lunStatus(pair.b, 'lun1');
      const hashBefore = await sha256File(files.b1);
      const res = await overlapWrites(pair.b.uri('lun1'));
      expect(res.writes).to.equal(4000);
      // The script's FLUSH waited for the lag: right after it, nothing may be in flight and the
      // secondary must already hold every write.
      const flushed = await lunStatus(pair.b, 'lun1');
      const [p, s] = await Promise.all([sha256File(files.b1), sha256File(files.a1)]);
      expect({ inflight: flushed.inflight, lagBytes: flushed.lagBytes }, 'lag after FLUSH').to.deep.equal({ inflight: 0, lagBytes: 0 });
      expect(p, 'the writes changed the primary').to.not.equal(hashBefore);
      expect(s, `a:lun1 (secondary) == b:lun1 (primary) right after FLUSH, python seed ${res.seed}`).to.equal(p);
      // And the status agrees once drained (it already is).
      const after = await waitDrained(pair.b, 'lun1');
      expect(await sha256File(files.a1)).to.equal(p);
      expect(await fileSize(files.a1)).to.equal(SIZE);

      expect(after.state).to.equal('uptodate');
      expect(after.mode).to.equal('async');
      expect(after.mirrored!.ops - before.mirrored!.ops).to.equal(4000);
      expect(after.mirrored!.bytes - before.mirrored!.bytes).to.equal(res.bytes);
      expect(after.mirrored!.failures).to.equal(0);
      const sec = await lunStatus(pair.a, 'lun1');
      expect(sec.appliedSeq).to.equal(after.mirrored!.ops);
      expect(sec.applied!.errors).to.equal(0);
    });

    it('async: a write completes while the secondary site is frozen; a FLUSH returns only once the secondary has it', async function () {
      // 16 MiB: more than the loopback socket buffers hold, so part of the mirror write is still
      // queued at b when a is thawed, while the (small) mirror FLUSH is not.
      const OFF = 8 * MiB;
      const LEN = 16 * MiB;
      const PATTERN = 0x4b;
      const pid = pair.a.proc.pid!;
      let frozen = false;
      const thaw = () => {
        if (frozen) process.kill(pid, 'SIGCONT');
        frozen = false;
      };
      const start = await waitDrained(pair.b, 'lun1');
      process.kill(pid, 'SIGSTOP');
      frozen = true;
      try {
        // Async: the host's write completes although the secondary cannot take it now. (libnbd,
        // not qemu-io: qemu flushes when it closes the image, and that FLUSH must wait.)
        await libnbd(pair.b.uri('lun1'), `h.pwrite(bytes([${PATTERN}]) * ${LEN}, ${OFF})`);
        const lag = await lunStatus(pair.b, 'lun1');
        expect({ inflight: lag.inflight, lagBytes: lag.lagBytes }, 'lag while the secondary is frozen')
          .to.deep.equal({ inflight: 1, lagBytes: LEN });
        expect((await readAt(files.a1, OFF, 4096)).every((x) => x === PATTERN), 'secondary has the write already').to.equal(false);

        const flush = libnbd(pair.b.uri('lun1'), 'h.flush()');
        flush.catch(() => undefined);   // awaited below; don't let a rejection go unhandled meanwhile
        // Thaw a only once b is processing the host's FLUSH.
        await pollUntil(async () => (await lunStatus(pair.b, 'lun1')).counters.flushOps > lag.counters.flushOps,
          { timeoutMs: 10_000, intervalMs: 20, what: 'b to receive the FLUSH' });
        thaw();
        await flush;
        // No polling from here on: the FLUSH must already have waited for the lag.
        const after = await lunStatus(pair.b, 'lun1');
        expect({ inflight: after.inflight, lagBytes: after.lagBytes }, 'lag right after FLUSH').to.deep.equal({ inflight: 0, lagBytes: 0 });
        const got = await readAt(files.a1, OFF, LEN);
        expect(got.every((x) => x === PATTERN), 'secondary holds the whole write right after FLUSH').to.equal(true);
        expect(await sha256File(files.a1)).to.equal(await sha256File(files.b1));
        expect(after.state).to.equal('uptodate');
        expect(after.mirrored!.ops).to.equal(start.mirrored!.ops + 1);
      } finally {
        thaw();
      }
    });
  });

  describe('refused pairs: a LUN missing on the peer, a smaller secondary', function () {
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let pair: Pair;
    const files = { a0: '', solo: '', aBig: '', b0: '', bBig: '' };
    let bBigHash = '';

    before(async function () {
      dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      files.a0 = await sparseFile(dir.join('a-lun0.img'), 4 * MiB);
      files.solo = await sparseFile(dir.join('a-solo.img'), 4 * MiB);
      files.aBig = await sparseFile(dir.join('a-big.img'), 8 * MiB);
      files.b0 = await sparseFile(dir.join('b-lun0.img'), 4 * MiB);
      files.bBig = await randomFile(dir.join('b-big.img'), 4 * MiB);
      bBigHash = await sha256File(files.bBig);
      pair = await startPair({
        a: { luns: [
          { name: 'lun0', path: files.a0, role: 'primary', mirror: 'sync' },
          { name: 'solo', path: files.solo, role: 'primary', mirror: 'sync' },
          { name: 'big', path: files.aBig, role: 'primary', mirror: 'sync' },
        ] },
        b: { luns: [
          { name: 'lun0', path: files.b0, role: 'secondary', mirror: 'none' },
          { name: 'big', path: files.bBig, role: 'secondary', mirror: 'none' },
        ] },
      });
      cleanup.add('stop pair', () => pair.stop());
    });

    after(() => cleanup.run());

    it('reports unpaired with a reason; the other LUN is uptodate', async function () {
      const st = await waitLunStates(pair.a, { lun0: 'uptodate', solo: 'unpaired', big: 'unpaired' });
      const byName = new Map(st.luns.map((l) => [l.name, l]));
      expect(byName.get('solo')!.reason).to.match(/no LUN of that name/);
      expect(byName.get('big')!.reason).to.match(/smaller/);
      expect(byName.get('lun0')!.reason).to.not.match(/smaller|no LUN/);
      const b = await siteStatus(pair.b);
      expect(b.luns.find((l) => l.name === 'lun0')!.state).to.equal('secondary-uptodate');
      // Refused, so it never synced: no state of the primary (issue 19.2).
      expect(b.luns.find((l) => l.name === 'big')!.state).to.equal('secondary-inconsistent');
      expect(b.luns.find((l) => l.name === 'big')!.reason).to.match(/never synced/);
    });

    it('the paired LUN still mirrors; the refused secondary stays untouched; unpaired LUNs write locally', async function () {
      await waitLunStates(pair.a, { lun0: 'uptodate', solo: 'unpaired', big: 'unpaired' });
      const a0Before = await sha256File(files.a0);
      await qemuWrite(pair.a.uri('lun0'), 0x3c, 12345, 100_000);
      await qemuWrite(pair.a.uri('big'), 0x5d, 0, 8 * MiB);
      await qemuWrite(pair.a.uri('solo'), 0x6e, 4096, 4096);

      const [a0, b0] = await Promise.all([sha256File(files.a0), sha256File(files.b0)]);
      expect(a0, 'a:lun0 took the write').to.not.equal(a0Before);
      expect(b0, 'b:lun0 == a:lun0').to.equal(a0);
      const aBig = await fs.readFile(files.aBig);
      expect(aBig.every((x) => x === 0x5d), 'a:big took the write locally').to.equal(true);
      expect(await sha256File(files.bBig), 'b:big untouched').to.equal(bBigHash);
      expect(await fileSize(files.bBig)).to.equal(4 * MiB);

      const st = await siteStatus(pair.a);
      const byName = new Map(st.luns.map((l) => [l.name, l]));
      expect(byName.get('lun0')!.state).to.equal('uptodate');
      expect(byName.get('lun0')!.mirrored!.ops).to.be.greaterThan(0);
      expect(byName.get('big')!.state).to.equal('unpaired');
      expect(byName.get('big')!.mirrored!.ops, 'nothing mirrored for a refused LUN').to.equal(0);
      expect(byName.get('solo')!.mirrored!.ops).to.equal(0);
      const bs = await lunStatus(pair.b, 'big');
      expect(bs.applied!.ops).to.equal(0);
    });
  });
});
