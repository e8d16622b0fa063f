// The persistent dirty-region bitmap: layout, mark/clear persistence, the single-writer rule,
// region arithmetic, header checks and SIGKILL.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { crc32c } from '@node-rs/crc32';
import { expect } from 'chai';
import { BitmapError, RegionBitmap } from '../../src/persist/bitmap.js';
import { tmpDir, type TmpDir } from '../helpers/tmp.js';

const KiB = 1024;
const RS = 64 * KiB;
const HEADER = 26;
const REPO = fileURLToPath(new URL('../../', import.meta.url));

describe('region bitmap', function () {
  this.timeout(60_000);
  let dir: TmpDir;
  let file: string;
  const open: RegionBitmap[] = [];

  async function openB(size: number, rs = RS, p = file): Promise<RegionBitmap> {
    const b = await RegionBitmap.open(p, size, rs);
    open.push(b);
    return b;
  }

  async function closeB(b: RegionBitmap): Promise<void> {
    open.splice(open.indexOf(b), 1);
    await b.close();
  }

  /** The set regions as the file holds them now. */
  function onDisk(regions: number, p = file): number[] {
    const buf = fs.readFileSync(p);
    const out: number[] = [];
    for (let r = 0; r < regions; r++) if (buf[HEADER + (r >> 3)] & (1 << (r & 7))) out.push(r);
    return out;
  }

  beforeEach(async () => {
    dir = await tmpDir('nbd-bitmap-test-');
    file = dir.join('lun.bitmap');
  });

  afterEach(async () => {
    for (const b of open.splice(0)) await b.close().catch(() => undefined);
    await dir.cleanup();
  });

  it('creates the documented file, all clear, mode 0600', async () => {
    const size = 100 * RS + 1;   // 101 regions, 13 bytes of bits
    const b = await openB(size);
    expect([b.regions, b.regionSize, b.count]).to.deep.equal([101, RS, 0]);
    await closeB(b);
    const buf = await fsp.readFile(file);
    expect((await fsp.stat(file)).mode & 0o777).to.equal(0o600);
    expect(buf.length).to.equal(HEADER + 13);
    expect(buf.subarray(0, 8).toString('latin1')).to.equal('NBDMBMAP');
    expect(buf.readUInt16BE(8)).to.equal(1);
    expect(Number(buf.readBigUInt64BE(10))).to.equal(size);
    expect(buf.readUInt32BE(18)).to.equal(RS);
    expect(buf.readUInt32BE(22)).to.equal(crc32c(buf.subarray(0, 22)) >>> 0);
    expect(buf.subarray(HEADER).equals(Buffer.alloc(13))).to.equal(true);
    expect(await fsp.readdir(dir.path)).to.deep.equal(['lun.bitmap']);
  });

  it('regionsOf: edges, the last partial region, empty and out-of-range ranges', async () => {
    const size = 10 * RS + 100;
    const b = await openB(size);
    expect(b.regions).to.equal(11);
    expect(b.regionsOf(0, 1)).to.deep.equal([0, 0]);
    expect(b.regionsOf(0, RS)).to.deep.equal([0, 0]);
    expect(b.regionsOf(0, RS + 1)).to.deep.equal([0, 1]);
    expect(b.regionsOf(RS - 1, 2)).to.deep.equal([0, 1]);
    expect(b.regionsOf(RS, RS)).to.deep.equal([1, 1]);
    expect(b.regionsOf(0, size)).to.deep.equal([0, 10]);
    expect(b.regionsOf(10 * RS, 100)).to.deep.equal([10, 10]);
    expect(b.regionsOf(size - 1, 1)).to.deep.equal([10, 10]);
    expect(b.regionsOf(5 * RS, 0)).to.deep.equal([5, 4]);   // touches nothing
    expect(() => b.regionsOf(size - 1, 2)).to.throw(RangeError);
    expect(() => b.regionsOf(-1, 2)).to.throw(RangeError);
    expect(() => b.mark(size, 1)).to.throw(RangeError);
    expect(() => b.isSet(11)).to.throw(RangeError);
    expect(() => b.clear(-1)).to.throw(RangeError);
    expect(b.mark(3 * RS, 0)).to.equal(null);
    await b.mark(size - 1, 1);
    expect(b.setRegions()).to.deep.equal([10]);
    expect(onDisk(11)).to.deep.equal([10]);
  });

  it('mark() has new bits on the file when it returns (null: nothing to wait for); set bits cost nothing', async () => {
    const b = await openB(1024 * RS);
    expect(b.mark(5 * RS + 10, 3 * RS)).to.equal(null);   // regions 5..8, written synchronously
    expect(onDisk(1024)).to.deep.equal([5, 6, 7, 8]);
    expect(b.mark(6 * RS, 1)).to.equal(null);
    expect(b.mark(5 * RS, 4 * RS)).to.equal(null);
    expect(b.mark(8 * RS + RS - 1, 2)).to.equal(null);   // region 9 is new
    expect(onDisk(1024)).to.deep.equal([5, 6, 7, 8, 9]);
    expect(b.count).to.equal(5);
    expect(b.isSet(9)).to.equal(true);
    expect(b.isSet(10)).to.equal(false);
  });

  it('every mark() promise resolves only once its bits are on the file', async () => {
    const regions = 4096;
    const b = await openB(regions * RS);
    const checks: Promise<void>[] = [];
    for (let i = 0; i < 2000; i++) {
      const r = (i * 2654435761) % regions;
      const n = 1 + (i % 3);
      const last = Math.min(regions - 1, r + n - 1);
      const p = b.mark(r * RS, (last - r + 1) * RS);
      const check = () => {
        const disk = new Set(onDisk(regions));
        for (let x = r; x <= last; x++) expect(disk.has(x), `region ${x}`).to.equal(true);
      };
      if (p) checks.push(p.then(check));
      else check();
    }
    await Promise.all(checks);
  });

  it('set bits survive reopening without close or sync (as after SIGKILL)', async () => {
    const b = await openB(64 * RS);
    await Promise.all([b.mark(0, 1), b.mark(17 * RS, 2 * RS), b.mark(63 * RS, RS)]);
    const other = await openB(64 * RS, RS, file);   // reads the file as a restarted process would
    expect(other.setRegions()).to.deep.equal([0, 17, 18, 63]);
    expect(other.count).to.equal(4);
  });

  it('clear() is persisted by sync() (and by flushDirty())', async () => {
    const b = await openB(64 * RS);
    await b.mark(0, 20 * RS);
    b.clear(3);
    b.clear(3);   // idempotent
    b.clear(19);
    expect(b.count).to.equal(18);
    expect(onDisk(64)).to.include(3);   // only in memory so far
    await b.sync();
    expect(onDisk(64)).to.not.include.members([3, 19]);
    b.clear(0);
    await b.flushDirty();
    expect(onDisk(64)).to.not.include(0);
    await closeB(b);
    const again = await openB(64 * RS);
    expect(again.setRegions()).to.deep.equal([1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
  });

  it('concurrent marks and clears in the same bytes end consistent on the file; one write per byte in flight', async () => {
    const regions = 64;   // 8 bytes: plenty of same-byte collisions
    const b = await openB(regions * RS);
    // Watch the bitmap's writes (synchronous: none can be overtaken by an older one).
    const real = fs.writeSync;
    const inflight: [number, number][] = [];
    let overlaps = 0;
    let writes = 0;
    (fs as { writeSync: unknown }).writeSync = (fd: number, buf: Buffer, off: number, len: number, pos: number) => {
      const range: [number, number] = [pos, pos + len];
      if (inflight.some(([a, z]) => a < range[1] && range[0] < z)) overlaps++;
      inflight.push(range);
      writes++;
      try {
        return real(fd, buf, off, len, pos);
      } finally {
        inflight.splice(inflight.indexOf(range), 1);
      }
    };
    try {
      const ops: Promise<void>[] = [];
      let seed = 12345;
      const rnd = (n: number) => {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        return seed % n;
      };
      for (let i = 0; i < 3000; i++) {
        const r = rnd(regions);
        if (rnd(3) === 0) {
          if (b.isSet(r)) b.clear(r);
        } else {
          const n = r === regions - 1 ? 1 : 1 + rnd(2);
          const p = b.mark(r * RS, n * RS);
          if (p) ops.push(p);
        }
        if (i % 97 === 0) ops.push(b.flushDirty());
        if (i % 50 === 0) await Promise.resolve();   // let some writes start and finish in between
        if (i % 300 === 0 && ops.length) await ops[ops.length - 1];
      }
      await Promise.all(ops);
      await b.sync();
    } finally {
      (fs as { writeSync: unknown }).writeSync = real;
    }
    expect(overlaps).to.equal(0);
    expect(writes).to.be.greaterThan(1);
    expect(onDisk(regions)).to.deep.equal(b.setRegions());
    await closeB(b);
    const again = await openB(regions * RS);
    expect(again.setRegions()).to.deep.equal(onDisk(regions));
  });

  it('refuses a file made for another geometry, or that is not a bitmap', async () => {
    const b = await openB(100 * RS);
    await b.mark(0, RS);
    await closeB(b);
    const orig = await fsp.readFile(file);
    const fails = async (size: number, rs: number, re: RegExp) => {
      let err: unknown = null;
      await RegionBitmap.open(file, size, rs).then((x) => x.close(), (e: unknown) => { err = e; });
      expect(err).to.be.instanceOf(BitmapError);
      expect((err as Error).message).to.include(file);
      expect((err as Error).message).to.match(re);
    };
    await fails(100 * RS, 4 * KiB, /made for a LUN of 6553600 bytes with 65536-byte regions, now 6553600 bytes with 4096-byte regions/);
    await fails(200 * RS, RS, /made for a LUN of 6553600 bytes/);
    expect((await fsp.readFile(file)).equals(orig)).to.equal(true);   // left alone
    const damaged = async (mutate: (b: Buffer) => Buffer, re: RegExp) => {
      await fsp.writeFile(file, mutate(Buffer.from(orig)));
      await fails(100 * RS, RS, re);
    };
    await damaged((x) => { x[1] = 0; return x; }, /not a region bitmap \(bad magic/);
    await damaged((x) => { x.writeUInt16BE(9, 8); return x; }, /format version 9/);
    await damaged((x) => { x[12] ^= 4; return x; }, /header CRC mismatch/);
    await damaged((x) => x.subarray(0, x.length - 1), /file has 38 bytes, 39 expected/);
    await damaged((x) => x.subarray(0, 10), /shorter than a bitmap header/);
  });

  it('a zero-size LUN has no regions', async () => {
    const b = await openB(0);
    expect([b.regions, b.count]).to.deep.equal([0, 0]);
    expect(b.mark(0, 0)).to.equal(null);
    expect(b.regionsOf(0, 0)).to.deep.equal([0, -1]);
    await b.sync();
  });

  it('set bits reported before a SIGKILL survive it', async () => {
    const regions = 100_000;
    const js = dir.join('child.mjs');
    const url = new URL('src/persist/bitmap.ts', `file://${REPO}`).href;
    await fsp.writeFile(js, `
      import { RegionBitmap } from ${JSON.stringify(url)};
      const b = await RegionBitmap.open(process.argv[2], ${regions} * 65536, 65536);
      let seed = 7;
      const inflight = new Set();
      for (let i = 0; ; i++) {
        for (let n = 0; n < 64 && inflight.size < 64; n++) {
          seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
          const r = seed % ${regions};
          const p = b.mark(r * 65536, 65536);
          if (p === null) { process.stdout.write(r + '\\n'); continue; }
          const q = p.then(() => { process.stdout.write(r + '\\n'); inflight.delete(q); });
          inflight.add(q);
          if (r % 3 === 0 && b.isSet((r + 1) % ${regions})) b.clear((r + 1) % ${regions});
        }
        if (inflight.size) await Promise.race(inflight);
        else await new Promise((r) => setImmediate(r));
      }
    `);
    const child = spawn(process.execPath, ['--import', 'tsx', js, file], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.on('exit', (code, sig) => resolve(sig ?? code)));
    const acked: number[] = [];
    let partial = '';
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => {
        const lines = (partial + d.toString()).split('\n');
        partial = lines.pop()!;
        for (const l of lines) acked.push(Number(l));
        if (acked.length >= 5000) {
          child.kill('SIGKILL');
          resolve();
        }
      });
      void exited.then((how) => reject(new Error(`child exited (${how}) early: ${stderr}`)));
    });
    expect(await exited).to.equal('SIGKILL');
    // A region the child cleared again after reporting it may be clear: only check the ones it
    // never cleared (clears hit region r+1 for r % 3 === 0).
    const cleared = new Set<number>();
    for (const r of acked) if (r % 3 === 0) cleared.add((r + 1) % regions);
    const b = await openB(regions * RS);
    for (const r of acked) if (!cleared.has(r)) expect(b.isSet(r), `region ${r}`).to.equal(true);
  });
});
