// Backing on real temp files (ext4/xfs/tmpfs hole semantics via SEEK_DATA/SEEK_HOLE) and on a
// real loop device.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Backing, type Extent } from '../../src/storage/backing.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The error a promise rejected with (fails the test when it resolves). */
async function rejection(p: Promise<unknown>): Promise<NodeJS.ErrnoException> {
  return p.then(
    () => { throw new Error('expected a rejection'); },
    (err: NodeJS.ErrnoException) => err,
  );
}

function makeFile(file: string, size: number, data: Array<[number, Buffer]> = []): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (const [off, buf] of data) fs.writeSync(fd, buf, 0, buf.length, off);
  } finally {
    fs.closeSync(fd);
  }
}

function pread(file: string, pos: number, len: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, pos);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

describe('Backing on a regular file', function () {
  let dir: string;
  const open: Backing[] = [];

  async function openFile(name: string, size: number, data: Array<[number, Buffer]> = [], readOnly = false): Promise<{ b: Backing; file: string }> {
    const file = path.join(dir, name);
    makeFile(file, size, data);
    const b = await Backing.open(file, readOnly);
    open.push(b);
    return { b, file };
  }

  before(function () { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-backing-')); });
  afterEach(async function () {
    for (const b of open.splice(0)) await b.close().catch(() => undefined);
  });
  after(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  it('reports the file size and not a block device', async function () {
    const { b } = await openFile('size.img', 3 * MiB + 512);
    expect(b.size).to.equal(3 * MiB + 512);
    expect(b.isBlockDevice).to.equal(false);
    expect(b.readOnly).to.equal(false);
  });

  it('round-trips writes and reads at unaligned offsets', async function () {
    const { b, file } = await openFile('rt.img', 1 * MiB);
    const d1 = randomBytes(10_007);
    const d2 = randomBytes(333);
    await b.write(d1, 4097);
    await b.write(d2, 1 * MiB - 333);          // up to the very end
    const out = Buffer.alloc(10_007 + 200);
    await b.read(out, 4097 - 100);
    expect(out.equals(Buffer.concat([Buffer.alloc(100), d1, Buffer.alloc(100)]))).to.equal(true);
    const tail = Buffer.alloc(333);
    await b.read(tail, 1 * MiB - 333);
    expect(tail.equals(d2)).to.equal(true);
    await b.flush();
    expect(pread(file, 4097, d1.length).equals(d1), 'in the file').to.equal(true);
    expect(fs.statSync(file).size, 'size unchanged').to.equal(1 * MiB);
  });

  it('a read past the end of the file fails with EIO (short read)', async function () {
    const { b } = await openFile('short.img', 64 * KiB, [[0, randomBytes(64 * KiB)]]);
    const err = await rejection(b.read(Buffer.alloc(4096), 62 * KiB));
    expect(err.code).to.equal('EIO');
  });

  it('zero() with mayPunch makes a hole that extents() reports, and frees the blocks', async function () {
    const data = randomBytes(256 * KiB);
    const { b, file } = await openFile('punch.img', 256 * KiB, [[0, data]]);
    expect(b.extents(0, 256 * KiB, 16)).to.deep.equal([{ length: 256 * KiB, hole: false }]);
    const blocksBefore = fs.statSync(file).blocks;
    await b.zero(64 * KiB, 128 * KiB, true, false);
    expect(b.extents(0, 256 * KiB, 16)).to.deep.equal([
      { length: 64 * KiB, hole: false }, { length: 128 * KiB, hole: true }, { length: 64 * KiB, hole: false },
    ]);
    const out = Buffer.alloc(256 * KiB);
    await b.read(out, 0);
    const expected = Buffer.from(data);
    expected.fill(0, 64 * KiB, 192 * KiB);
    expect(out.equals(expected)).to.equal(true);
    expect(fs.statSync(file).blocks).to.be.lessThan(blocksBefore);
    expect(fs.statSync(file).size).to.equal(256 * KiB);
  });

  it('zero() without mayPunch reads back zeros and keeps the blocks allocated', async function () {
    const data = randomBytes(256 * KiB);
    const { b, file } = await openFile('nohole.img', 256 * KiB, [[0, data]]);
    await b.flush();
    const blocksBefore = fs.statSync(file).blocks;
    await b.zero(4096 + 17, 100 * KiB, false, false);   // unaligned edges
    const out = Buffer.alloc(256 * KiB);
    await b.read(out, 0);
    const expected = Buffer.from(data);
    expected.fill(0, 4096 + 17, 4096 + 17 + 100 * KiB);
    expect(out.equals(expected)).to.equal(true);
    expect(fs.statSync(file).blocks).to.equal(blocksBefore);
    expect(fs.statSync(file).size).to.equal(256 * KiB);
  });

  it('zero() with fastOnly succeeds on a file (punching is fast)', async function () {
    const { b } = await openFile('fast.img', 128 * KiB, [[0, randomBytes(128 * KiB)]]);
    await b.zero(0, 64 * KiB, true, true);
    const out = Buffer.alloc(64 * KiB);
    await b.read(out, 0);
    expect(out.equals(Buffer.alloc(64 * KiB))).to.equal(true);
  });

  it('trim() punches a hole', async function () {
    const { b, file } = await openFile('trim.img', 512 * KiB, [[0, randomBytes(512 * KiB)]]);
    const blocksBefore = fs.statSync(file).blocks;
    await b.trim(128 * KiB, 256 * KiB);
    expect(b.extents(0, 512 * KiB, 16)).to.deep.equal([
      { length: 128 * KiB, hole: false }, { length: 256 * KiB, hole: true }, { length: 128 * KiB, hole: false },
    ]);
    const out = Buffer.alloc(256 * KiB);
    await b.read(out, 128 * KiB);
    expect(out.equals(Buffer.alloc(256 * KiB))).to.equal(true);
    expect(fs.statSync(file).blocks).to.be.lessThan(blocksBefore);
    expect(fs.statSync(file).size, 'size kept').to.equal(512 * KiB);
  });

  describe('extents()', function () {
    // data [0, 64K), hole [64K, 192K), data [192K, 256K), hole [256K, 512K) to end of file
    let b: Backing;
    before(async function () {
      const file = path.join(dir, 'map.img');
      makeFile(file, 512 * KiB, [[0, randomBytes(64 * KiB)], [192 * KiB, randomBytes(64 * KiB)]]);
      b = await Backing.open(file, true);
    });
    after(async function () { await b?.close(); });

    const sum = (e: Extent[]) => e.reduce((n, x) => n + x.length, 0);

    it('maps data / hole / data / hole-to-end', function () {
      expect(b.extents(0, 512 * KiB, 100)).to.deep.equal([
        { length: 64 * KiB, hole: false },
        { length: 128 * KiB, hole: true },
        { length: 64 * KiB, hole: false },
        { length: 256 * KiB, hole: true },
      ]);
    });

    it('clips to the requested range (starting inside a hole, ending inside data)', function () {
      expect(b.extents(100 * KiB, 100 * KiB, 100)).to.deep.equal([
        { length: 92 * KiB, hole: true }, { length: 8 * KiB, hole: false },
      ]);
      expect(b.extents(10, 100, 100)).to.deep.equal([{ length: 100, hole: false }]);
      expect(b.extents(300 * KiB, 4096, 100)).to.deep.equal([{ length: 4096, hole: true }]);
    });

    it('returns at most `max` extents, covering a prefix of the range', function () {
      const all = b.extents(0, 512 * KiB, 100);
      for (let max = 1; max <= 4; max++) {
        const got = b.extents(0, 512 * KiB, max);
        expect(got, `max ${max}`).to.deep.equal(all.slice(0, max));
        expect(sum(got)).to.be.at.most(512 * KiB);
      }
      expect(b.extents(32 * KiB, 256 * KiB, 1)).to.deep.equal([{ length: 32 * KiB, hole: false }]);
      expect(b.extents(64 * KiB, 192 * KiB, 1)).to.deep.equal([{ length: 128 * KiB, hole: true }]);
    });

    it('an all-hole file is one hole extent', async function () {
      const { b: empty } = await openFile('empty.img', 1 * MiB);
      expect(empty.extents(0, 1 * MiB, 10)).to.deep.equal([{ length: 1 * MiB, hole: true }]);
    });
  });

  it('a read-only Backing refuses writes', async function () {
    const { b } = await openFile('ro.img', 64 * KiB, [], true);
    expect(b.readOnly).to.equal(true);
    const err = await rejection(b.write(Buffer.alloc(512), 0));
    expect(err.code).to.equal('EBADF');
  });

  it('open() refuses a directory and reports a missing file', async function () {
    const notFile = await rejection(Backing.open(dir, false));
    expect(notFile.message).to.match(/neither a regular file nor a block device/);
    const missing = await rejection(Backing.open(path.join(dir, 'missing.img'), false));
    expect(missing.code).to.equal('ENOENT');
  });

  it('flush() and cache() succeed', async function () {
    const { b } = await openFile('misc.img', 64 * KiB, [[0, randomBytes(64 * KiB)]]);
    await b.flush();
    await b.cache(0, 64 * KiB);
    await b.write(Buffer.from('x'), 5);
    await b.flush();
    const out = Buffer.alloc(1);
    await b.read(out, 5);
    expect(out.toString()).to.equal('x');
  });
});

describe('Backing on a loop block device', function () {
  const SIZE = 16 * MiB;
  let dir = '';
  let image = '';
  let loop = '';
  let b: Backing | null = null;

  before(async function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-loop-'));
    image = path.join(dir, 'disk.img');
    makeFile(image, SIZE);
    loop = execFileSync('losetup', ['-f', '--show', image], { encoding: 'utf8' }).trim();
    b = await Backing.open(loop, false);
  });
  after(async function () {
    if (b) await b.close().catch(() => undefined);
    if (loop) execFileSync('losetup', ['-d', loop]);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('is a block device whose size (sysfs) is 16 MiB', function () {
    expect(loop).to.match(/^\/dev\/loop\d+$/);
    expect(b!.isBlockDevice).to.equal(true);
    expect(b!.size).to.equal(SIZE);
    const sectors = Number(fs.readFileSync(`/sys/block/${path.basename(loop)}/size`, 'utf8').trim());
    expect(b!.size).to.equal(sectors * 512);
  });

  it('writes and reads back (unaligned), and the data reaches the image file', async function () {
    const data = randomBytes(5000);
    await b!.write(data, 8 * MiB + 123);
    const out = Buffer.alloc(5000);
    await b!.read(out, 8 * MiB + 123);
    expect(out.equals(data)).to.equal(true);
    const last = randomBytes(4096);
    await b!.write(last, SIZE - 4096);
    const lastOut = Buffer.alloc(4096);
    await b!.read(lastOut, SIZE - 4096);
    expect(lastOut.equals(last)).to.equal(true);
    await b!.flush();
    expect(pread(image, 8 * MiB + 123, 5000).equals(data)).to.equal(true);
  });

  it('zero() makes the range read as zeros (either mayPunch)', async function () {
    for (const mayPunch of [true, false]) {
      await b!.write(randomBytes(64 * KiB), 1 * MiB);
      await b!.zero(1 * MiB + 4096, 32 * KiB, mayPunch, false);
      const out = Buffer.alloc(32 * KiB);
      await b!.read(out, 1 * MiB + 4096);
      expect(out.equals(Buffer.alloc(32 * KiB)), `mayPunch ${mayPunch}`).to.equal(true);
      const edge = Buffer.alloc(4096);
      await b!.read(edge, 1 * MiB);
      expect(edge.equals(Buffer.alloc(4096)), 'data before the zeroed range kept').to.equal(false);
    }
  });

  it('trim() does not fail, and extents() reports all data', async function () {
    await b!.trim(2 * MiB, 1 * MiB);
    expect(b!.extents(0, SIZE, 10)).to.deep.equal([{ length: SIZE, hole: false }]);
    expect(b!.extents(4096, 8192, 10)).to.deep.equal([{ length: 8192, hole: false }]);
  });

  it('is opened exclusively: a second read-write open fails with EBUSY', async function () {
    const err = await rejection(Backing.open(loop, false));
    expect(err.code).to.equal('EBUSY');
  });
});
