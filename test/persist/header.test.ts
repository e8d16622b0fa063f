// The persist kit's header codec, through the three kinds that use it (journal, undo log,
// bitmap): the bytes it encodes, and a clear, kind-specific message for each way a header can
// be wrong (short file, bad magic, other version, truncated name, CRC mismatch).
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { crc32c } from '@node-rs/crc32';
import { expect } from 'chai';
import { closeFd, openFile } from '../../src/persist/file-io.js';
import { encodeHeader, readHeader, type HeaderKind } from '../../src/persist/header.js';
import {
  BITMAP_HEADER, BITMAP_MAGIC, JOURNAL_HEADER, JOURNAL_MAGIC, journalHeaderFixed,
} from '../../src/persist/record.js';
import { UNDO_HEADER, UNDO_MAGIC } from '../../src/persist/undo-records.js';
import { tmpDir, type TmpDir } from '../helpers/tmp.js';

const NAME = Buffer.from('lun-ä0', 'utf8');

describe('persist kit: header codec', () => {
  let dir: TmpDir;
  let file: string;

  beforeEach(async () => {
    dir = await tmpDir('nbd-header-test-');
    file = dir.join('h');
  });

  afterEach(() => dir.cleanup());

  /** readHeader() of a file holding `bytes`, with errors prefixed as the journal's are. */
  type AnyKind = HeaderKind<any>;
  async function check<F extends { magic: Buffer; version: number }>(kind: AnyKind, bytes: Buffer): Promise<{ fields: F; bytes: Buffer }> {
    await fsp.writeFile(file, bytes);
    const fd = await openFile(file, fs.constants.O_RDONLY);
    try {
      return await readHeader(kind as HeaderKind<F>, fd, bytes.length, (what) => new Error(`${kind.noun} ${file}: ${what}`));
    } finally {
      await closeFd(fd);
    }
  }

  async function message(kind: AnyKind, bytes: Buffer): Promise<string> {
    try {
      await check(kind, bytes);
    } catch (err) {
      return (err as Error).message.slice(`${kind.noun} ${file}: `.length);
    }
    throw new Error('the header was accepted');
  }

  const journal = () => encodeHeader(JOURNAL_HEADER, { magic: JOURNAL_MAGIC, version: 1, lunSize: 1 << 20, nameLen: NAME.length }, NAME);
  const undo = () => encodeHeader(UNDO_HEADER, { magic: UNDO_MAGIC, version: 1, lunSize: 1 << 20, granularity: 65536, nameLen: NAME.length }, NAME);
  const bitmap = () => encodeHeader(BITMAP_HEADER, { magic: BITMAP_MAGIC, version: 1, lunSize: 1 << 20, regionSize: 65536, headerCrc: 0 });

  it('encodes fixed part, name and a trailing crc32c of everything before it; reads it back', async () => {
    const j = journal();
    expect(j.length).to.equal(journalHeaderFixed.span + NAME.length + 4);
    expect(j.subarray(journalHeaderFixed.span, j.length - 4)).to.deep.equal(NAME);
    expect(j.readUInt32BE(j.length - 4)).to.equal(crc32c(j.subarray(0, j.length - 4)) >>> 0);
    const got = await check<{ magic: Buffer; version: number; lunSize: number; nameLen: number }>(JOURNAL_HEADER, Buffer.concat([j, Buffer.from('records')]));
    expect(got.fields).to.include({ version: 1, lunSize: 1 << 20, nameLen: NAME.length });
    expect(got.bytes).to.deep.equal(j);
    const b = bitmap();
    expect(b.length).to.equal(26);   // the CRC is the struct's own last field
    expect(b.readUInt32BE(22)).to.equal(crc32c(b.subarray(0, 22)) >>> 0);
    expect((await check<{ magic: Buffer; version: number; regionSize: number }>(BITMAP_HEADER, b)).fields.regionSize).to.equal(65536);
  });

  it('rejects a file shorter than the fixed part, naming the kind', async () => {
    expect(await message(JOURNAL_HEADER, journal().subarray(0, 5)))
      .to.equal('file of 5 bytes is shorter than a journal header (not a mirror journal, or truncated)');
    expect(await message(UNDO_HEADER, undo().subarray(0, 3)))
      .to.equal('file of 3 bytes is shorter than an undo log header (not an undo log, or truncated)');
    expect(await message(BITMAP_HEADER, bitmap().subarray(0, 25)))
      .to.equal('file of 25 bytes is shorter than a bitmap header (not a region bitmap, or truncated)');
  });

  it('rejects a bad magic', async () => {
    const j = journal();
    j.write('NOTAJRNL', 0, 'latin1');
    expect(await message(JOURNAL_HEADER, j)).to.equal('not a mirror journal (bad magic "NOTAJRNL")');
    expect(await message(BITMAP_HEADER, Buffer.concat([Buffer.from('NBDMJRNL'), bitmap().subarray(8)])))
      .to.equal('not a region bitmap (bad magic "NBDMJRNL")');
    expect(await message(UNDO_HEADER, Buffer.concat([Buffer.from('xxxxxxxx'), undo().subarray(8)])))
      .to.equal('not an undo log (bad magic "xxxxxxxx")');
  });

  it('rejects another format version (checked before the CRC)', async () => {
    const u = undo();
    u.writeUInt16BE(2, 8);
    expect(await message(UNDO_HEADER, u)).to.equal('undo log format version 2, this build reads version 1');
    const j = journal();
    j.writeUInt16BE(7, 8);
    expect(await message(JOURNAL_HEADER, j)).to.equal('journal format version 7, this build reads version 1');
  });

  it('rejects a header cut inside its name', async () => {
    const j = journal();
    expect(await message(JOURNAL_HEADER, j.subarray(0, j.length - 2)))
      .to.equal(`truncated header (${j.length - 2} bytes, header needs ${j.length})`);
  });

  it('rejects a CRC mismatch, printing the CRCs as each kind always has', async () => {
    const j = journal();
    j[journalHeaderFixed.span] ^= 0x01;   // a bit of the name
    const jc = crc32c(j.subarray(0, j.length - 4)) >>> 0;
    const js = j.readUInt32BE(j.length - 4);
    const pad = (n: number) => n.toString(16).padStart(8, '0');
    expect(await message(JOURNAL_HEADER, j)).to.equal(`header CRC mismatch (stored 0x${pad(js)}, computed 0x${pad(jc)}): corrupt header`);

    const b = bitmap();
    b.writeUInt32BE(0x00000abc, 22);
    const bc = crc32c(b.subarray(0, 22)) >>> 0;
    expect(await message(BITMAP_HEADER, b)).to.equal(`header CRC mismatch (stored 0xabc, computed 0x${bc.toString(16)}): corrupt header`);
  });
});
