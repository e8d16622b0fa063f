// Single-site NBD server driven by real clients: nbdinfo, qemu-io, nbdcopy.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { Cleanup, exec, execNoThrow, randomFile, readAt, sha256File, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_fast_zero: boolean;
  can_cache: boolean;
  can_multi_conn: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  contexts?: string[];
}

interface NbdinfoJson {
  protocol: string;
  structured?: boolean;
  exports: NbdinfoExport[];
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function nbdinfoJson(...args: string[]): Promise<NbdinfoJson> {
  const r = await exec('nbdinfo', ['--json', ...args], { timeoutMs: 30_000 });
  return JSON.parse(r.stdout) as NbdinfoJson;
}

/** Merge adjacent map entries of the same type (servers may split extents arbitrarily). */
function mergeMap(entries: MapEntry[]): { offset: number; length: number; type: number }[] {
  const out: { offset: number; length: number; type: number }[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, type: e.type });
  }
  return out;
}

describe('nbd clients against a single site', function () {
  describe('nbdinfo', function () {
    const cleanup = new Cleanup();
    let site: Site;
    const LUN0_SIZE = 64 * MiB;
    const RO_SIZE = 8 * MiB;

    before(async function () {
      const dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      // lun0: sparse, with exactly one allocated extent [1 MiB, 2 MiB) of random data.
      const lun0 = await sparseFile(dir.join('lun0.img'), LUN0_SIZE);
      const fh = await fs.open(lun0, 'r+');
      await fh.write(randomBytes(MiB), 0, MiB, MiB);
      await fh.close();
      const ro = await randomFile(dir.join('ro.img'), RO_SIZE);
      site = await startSite({
        luns: [
          { name: 'lun0', path: lun0, role: 'primary', mirror: 'none' },
          { name: 'ro', path: ro, role: 'primary', mirror: 'none', readOnly: true },
        ],
      });
      cleanup.add('stop site', () => site.stop());
    });

    after(() => cleanup.run());

    it('--list shows lun0 and ro with their sizes', async function () {
      const info = await nbdinfoJson('--list', site.uri());
      const byName = new Map(info.exports.map((e) => [e['export-name'], e]));
      expect([...byName.keys()]).to.include.members(['lun0', 'ro']);
      expect(byName.get('lun0')!['export-size']).to.equal(LUN0_SIZE);
      expect(byName.get('ro')!['export-size']).to.equal(RO_SIZE);
      expect(byName.get('ro')!.is_read_only).to.equal(true);
      expect(byName.get('lun0')!.is_read_only).to.equal(false);
    });

    it('plain --list output names both exports', async function () {
      const r = await exec('nbdinfo', ['--list', site.uri()], { timeoutMs: 30_000 });
      expect(r.stdout).to.match(/^export="lun0":$/m);
      expect(r.stdout).to.match(/^export="ro":$/m);
    });

    it('lun0 advertises size, flags, block sizes and base:allocation', async function () {
      const info = await nbdinfoJson('--no-content', site.uri('lun0'));
      expect(info.protocol).to.equal('newstyle-fixed');
      expect(info.structured, 'structured replies negotiated').to.equal(true);
      expect(info.exports).to.have.length(1);
      const e = info.exports[0]!;
      expect(e['export-size']).to.equal(LUN0_SIZE);
      expect(e.is_read_only).to.equal(false);
      expect({
        can_flush: e.can_flush,
        can_fua: e.can_fua,
        can_trim: e.can_trim,
        can_zero: e.can_zero,
        can_fast_zero: e.can_fast_zero,
        can_cache: e.can_cache,
        can_multi_conn: e.can_multi_conn,
      }).to.deep.equal({
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        can_fast_zero: true,
        can_cache: true,
        can_multi_conn: true,
      });
      expect([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum]).to.deep.equal([1, 4096, 64 * 1024 * 1024]);
      expect(e.contexts ?? []).to.include('base:allocation');
    });

    it('ro is read-only with the right size', async function () {
      const info = await nbdinfoJson('--no-content', site.uri('ro'));
      const e = info.exports[0]!;
      expect(e['export-name']).to.equal('ro');
      expect(e['export-size']).to.equal(RO_SIZE);
      expect(e.is_read_only).to.equal(true);
    });

    it('the empty export name maps to the first LUN (lun0)', async function () {
      // nbd://host:port with no path requests export "".
      const info = await nbdinfoJson('--no-content', site.uri());
      expect(info.exports[0]!['export-size']).to.equal(LUN0_SIZE);
      expect(info.exports[0]!.is_read_only).to.equal(false);
    });

    it('an unknown export name is refused', async function () {
      const r = await execNoThrow('nbdinfo', ['--no-content', site.uri('no-such-lun')], { timeoutMs: 30_000 });
      expect(r.code, r.stdout + r.stderr).to.not.equal(0);
      expect(site.isAlive()).to.equal(true);
    });

    it('--map reports the one written extent as data and the rest as hole+zero', async function () {
      const r = await exec('nbdinfo', ['--map', '--json', site.uri('lun0')], { timeoutMs: 30_000 });
      const map = JSON.parse(r.stdout) as MapEntry[];
      // Extents must tile the whole export.
      let pos = 0;
      for (const e of map) {
        expect(e.offset, `extent ${JSON.stringify(e)} is contiguous`).to.equal(pos);
        pos += e.length;
      }
      expect(pos, 'extents cover the export').to.equal(LUN0_SIZE);
      expect(mergeMap(map)).to.deep.equal([
        { offset: 0, length: MiB, type: 3 },
        { offset: MiB, length: MiB, type: 0 },
        { offset: 2 * MiB, length: LUN0_SIZE - 2 * MiB, type: 3 },
      ]);
    });

    it('logs only JSON objects on stdout', function () {
      expect(site.logs.length).to.be.greaterThan(0);
      const bad = site.logs.filter((line) => {
        try {
          const v: unknown = JSON.parse(line);
          return typeof v !== 'object' || v === null || Array.isArray(v);
        } catch {
          return true;
        }
      });
      expect(bad, 'non-JSON stdout lines').to.deep.equal([]);
    });
  });

  describe('qemu-io', function () {
    const cleanup = new Cleanup();
    let site: Site;
    let lun0: string;

    before(async function () {
      const dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      lun0 = await sparseFile(dir.join('lun0.img'), 64 * MiB);
      site = await startSite({ luns: [{ name: 'lun0', path: lun0, role: 'primary', mirror: 'none' }] });
      cleanup.add('stop site', () => site.stop());
    });

    after(() => cleanup.run());

    const qemuIo = (...cmds: string[]) =>
      execNoThrow('qemu-io', ['-f', 'raw', site.uri('lun0'), ...cmds.flatMap((c) => ['-c', c])], { timeoutMs: 30_000 });

    it('writes a pattern at an unaligned offset and reads it back', async function () {
      const w = await qemuIo('write -P 0xab 1000 12345', 'flush');
      expect(w.code, w.stdout + w.stderr).to.equal(0);
      expect(w.stdout).to.include('wrote 12345/12345 bytes at offset 1000');

      const r = await qemuIo('read -P 0xab 1000 12345', 'read -P 0 0 1000', 'read -P 0 13345 4096');
      expect(r.code, r.stdout + r.stderr).to.equal(0);
      expect(r.stdout).to.not.include('Pattern verification failed');
      expect(r.stdout).to.include('read 12345/12345 bytes at offset 1000');

      // The bytes landed exactly there in the backing file.
      const back = await readAt(lun0, 0, 16384);
      expect(back.subarray(0, 1000).every((b) => b === 0), 'bytes before the write untouched').to.equal(true);
      expect(back.subarray(1000, 13345).every((b) => b === 0xab), 'written range').to.equal(true);
      expect(back.subarray(13345).every((b) => b === 0), 'bytes after the write untouched').to.equal(true);
    });

    it('reports a pattern mismatch when reading with the wrong pattern', async function () {
      const r = await qemuIo('read -P 0xcd 1000 12345');
      expect(r.stdout + r.stderr).to.include('Pattern verification failed at offset 1000, 12345 bytes');
      expect(r.code).to.not.equal(0);
    });

    it('works through --image-opts driver=nbd with an explicit export', async function () {
      const opts = `driver=nbd,server.type=inet,server.host=${site.host},server.port=${site.port},export=lun0`;
      const r = await execNoThrow(
        'qemu-io',
        ['--image-opts', opts, '-c', 'write -P 0x5c 20001 8193', '-c', 'read -P 0x5c 20001 8193', '-c', 'read -P 0 28194 1000'],
        { timeoutMs: 30_000 },
      );
      expect(r.code, r.stdout + r.stderr).to.equal(0);
      expect(r.stdout).to.not.include('Pattern verification failed');
    });
  });

  describe('nbdcopy', function () {
    const cleanup = new Cleanup();
    let site: Site;
    let dir: Awaited<ReturnType<typeof tmpDir>>;
    let lun0: string;
    const SIZE = 256 * MiB;

    before(async function () {
      dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      lun0 = await sparseFile(dir.join('lun0.img'), SIZE);
      site = await startSite({ luns: [{ name: 'lun0', path: lun0, role: 'primary', mirror: 'none' }] });
      cleanup.add('stop site', () => site.stop());
    });

    after(() => cleanup.run());

    it('copies 256 MiB of random data in and out unchanged', async function () {
      const src = await randomFile(dir.join('src.bin'), SIZE);
      const out = dir.join('out.bin');
      await exec('nbdcopy', ['--flush', src, site.uri('lun0')], { timeoutMs: 60_000 });
      await exec('nbdcopy', [site.uri('lun0'), out], { timeoutMs: 60_000 });
      const [hSrc, hOut, hBacking] = await Promise.all([sha256File(src), sha256File(out), sha256File(lun0, SIZE)]);
      expect((await fs.stat(lun0)).size, 'backing file size unchanged').to.equal(SIZE);
      expect(hOut, 'copy-out equals source').to.equal(hSrc);
      expect(hBacking, 'backing file equals source').to.equal(hSrc);
    });
  });
});
