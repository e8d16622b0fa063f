// The persist kit's positional I/O: the position check (nothing is read or written at an offset
// a Number cannot hold exactly), full reads/writes, openOrCreate, the atomic replacement.
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { expect } from 'chai';
import {
  checkPosition, closeFd, openFile, openOrCreate, preadFull, pwriteFull, pwritevFull, replaceFileAtomic, zerosFrom,
} from '../../src/persist/file-io.js';
import { tmpDir, type TmpDir } from '../helpers/tmp.js';

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

describe('persist kit: positional I/O', () => {
  let dir: TmpDir;
  let file: string;
  let fd: number;

  beforeEach(async () => {
    dir = await tmpDir('nbd-file-io-test-');
    file = dir.join('f');
    fd = await openFile(file, fs.constants.O_RDWR | fs.constants.O_CREAT);
  });

  afterEach(async () => {
    await closeFd(fd).catch(() => undefined);
    await dir.cleanup();
  });

  it('checkPosition accepts safe non-negative integers only, end included', () => {
    expect(checkPosition(0, 0)).to.equal(null);
    expect(checkPosition(2 ** 53 - 11, 10)).to.equal(null);
    for (const [pos, len] of [[2 ** 53, 0], [2 ** 53 + 2, 1], [2 ** 53 - 5, 10], [-1, 1], [1.5, 1], [NaN, 1], [Infinity, 0]]) {
      const err = checkPosition(pos, len);
      expect(err, `${pos}+${len}`).to.be.instanceOf(RangeError);
      expect(err!.message).to.equal(`file position ${pos} (+${len}) is not a safe non-negative integer`);
    }
  });

  it('pread/pwrite/pwritev reject offsets above 2^53 and write nothing', async () => {
    const buf = Buffer.from('data');
    for (const pos of [2 ** 53 + 2, 2 ** 60, 2 ** 53 - 2]) {
      expect(await rejection(pwriteFull(fd, buf, pos))).to.be.instanceOf(RangeError);
      expect(await rejection(pwritevFull(fd, [buf, buf], pos))).to.be.instanceOf(RangeError);
      expect(await rejection(preadFull(fd, Buffer.alloc(4), 0, 4, pos))).to.be.instanceOf(RangeError);
    }
    expect((await fsp.stat(file)).size).to.equal(0);
  });

  it('writes and reads back at positions; a read at the end is short', async () => {
    await pwriteFull(fd, Buffer.from('hello'), 3);
    await pwritevFull(fd, [Buffer.from('ab'), Buffer.alloc(0), Buffer.from('cd')], 8);
    expect(await fsp.readFile(file)).to.deep.equal(Buffer.concat([Buffer.alloc(3), Buffer.from('helloabcd')]));
    const out = Buffer.alloc(10, 0xff);
    expect(await preadFull(fd, out, 1, 9, 5)).to.equal(7);   // 12 bytes in the file: 7 from offset 5
    expect(out.subarray(1, 8).toString()).to.equal('lloabcd');
    expect(out[8]).to.equal(0xff);
  });

  it('zerosFrom tells a zero tail from one with data', async () => {
    await pwriteFull(fd, Buffer.concat([Buffer.from('x'), Buffer.alloc(100)]), 0);
    expect(await zerosFrom(fd, 1, 101, Buffer.alloc(7))).to.equal(true);
    expect(await zerosFrom(fd, 0, 101, Buffer.alloc(7))).to.equal(false);
  });

  it('openOrCreate creates the file atomically with mode 0600, opens an existing one as it is, initialises a 0-byte one', async () => {
    const initial = Buffer.from('HEADER+body');
    const a = dir.join('a');
    const created = await openOrCreate(a, initial);
    await closeFd(created.fd);
    expect(created).to.include({ size: initial.length, fresh: false });
    expect(await fsp.readFile(a)).to.deep.equal(initial);
    expect((await fsp.stat(a)).mode & 0o777).to.equal(0o600);
    expect((await fsp.readdir(dir.path)).sort()).to.deep.equal(['a', 'f']);   // no temporary file left

    await fsp.writeFile(a, 'other content');
    const existing = await openOrCreate(a, initial);
    await closeFd(existing.fd);
    expect(existing).to.include({ size: 13, fresh: false });
    expect(await fsp.readFile(a, 'utf8')).to.equal('other content');

    await fsp.writeFile(a, '');
    const empty = await openOrCreate(a, initial);
    await closeFd(empty.fd);
    expect(empty).to.include({ size: initial.length, fresh: true });
    expect(await fsp.readFile(a)).to.deep.equal(initial);
  });

  it('replaceFileAtomic replaces the content, leaves no temporary file, keeps mode 0600', async () => {
    const m = dir.join('m.meta');
    await replaceFileAtomic(m, `${m}.tmp`, Buffer.from('one'));
    await replaceFileAtomic(m, `${m}.tmp`, Buffer.from('two!'));
    expect(await fsp.readFile(m, 'utf8')).to.equal('two!');
    expect((await fsp.stat(m)).mode & 0o777).to.equal(0o600);
    expect(fs.existsSync(`${m}.tmp`)).to.equal(false);
  });
});
