// The journal's recovery scan (format: docs/journal-format.md): the header check, then every
// record from the header on, stopping at the first that is incomplete (a torn tail) or bad (with
// more data behind it: corruption). Journal.open() acts on the verdict; Journal.inspect() reports it.
import fs from 'node:fs';
import { dirname } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { closeFd, fdatasync, fsyncDir, ftruncate, openFile, preadFull } from './file-io.js';
import { encodeHeader, hex8 as hex, readHeader } from './header.js';
import {
  JOURNAL_HEADER, JOURNAL_KIND, JOURNAL_MAGIC, JOURNAL_VERSION, journalHeaderFixed, KNOWN_RECORD_FLAGS as KNOWN_FLAGS,
  readRecordHeader, RECORD_CRC_OFFSET, RECORD_HEADER_SIZE, RECORD_MAGIC, type RecordHeader,
} from './record.js';

/** One record of the in-memory index. `dataPos`: file offset of its data; `recordBytes`: header + data. */
export interface JournalEntry {
  seq: number; dep: number; kind: number; flags: number; offset: number; length: number;
  dataPos: number; timeMs: number; recordBytes: number;
}

/** open() reads the journal in chunks of this size (larger records are read whole). */
const SCAN_CHUNK = 4 * 1024 * 1024;

export function encodeJournalHeader(name: Buffer, lunSize: number): Buffer {
  return encodeHeader(JOURNAL_HEADER, { magic: JOURNAL_MAGIC, version: JOURNAL_VERSION, lunSize, nameLen: name.length }, name);
}

/** Check the header of the journal `fd` (`size` bytes) for LUN `lunName` (`name`: its UTF-8) of `lunSize` bytes. */
export async function checkJournalHeader(fd: number, size: number, name: Buffer, lunName: string, lunSize: number,
  fail: (what: string) => Error): Promise<void> {
  const { fields: f, bytes: full } = await readHeader(JOURNAL_HEADER, fd, size, fail);
  const fixedSpan = journalHeaderFixed.span;
  const storedName = full.subarray(fixedSpan, fixedSpan + f.nameLen);
  if (!storedName.equals(name)) {
    throw fail(`belongs to LUN ${JSON.stringify(storedName.toString('utf8'))}, not ${JSON.stringify(lunName)}`);
  }
  if (f.lunSize !== lunSize) {
    throw fail(`was written for LUN ${JSON.stringify(lunName)} of ${f.lunSize} bytes, the LUN now has ${lunSize} bytes`);
  }
}

export interface Scan {
  entries: JournalEntry[];
  /** Where the valid records end, if the file goes on after them. */
  bad: null | { offset: number; reason: string; corrupt: boolean };
}

/** Read records from `from` to `size`, stopping at the first one that is incomplete or fails a check. */
export async function scanRecords(fd: number, from: number, size: number, lunSize: number): Promise<Scan> {
  const reader = new ChunkReader(fd, size);
  const entries: JournalEntry[] = [];
  let pos = from;
  while (pos < size) {
    const verdict = await readRecord(reader, pos, lunSize);
    if (typeof verdict !== 'string' && 'entry' in verdict) {
      entries.push(verdict.entry);
      pos += verdict.entry.recordBytes;
      continue;
    }
    // A bad spot. Torn tail: the file ends inside the record (judged by its header, if that is
    // plausible), or what follows the record's extent (its header alone, if the header is not
    // plausible) is shorter than a record header or all zeros (a file extended but never
    // written, as after a power loss). Otherwise it is corruption in the middle.
    if (typeof verdict !== 'string') return { entries, bad: { offset: pos, reason: 'incomplete record', corrupt: false } };
    const extentEnd = readExtent(await reader.get(pos, RECORD_HEADER_SIZE), lunSize, pos);
    const corrupt = size - extentEnd >= RECORD_HEADER_SIZE && !(await reader.zerosFrom(extentEnd));
    return { entries, bad: { offset: pos, reason: `bad record at offset ${pos}: ${verdict}`, corrupt } };
  }
  return { entries, bad: null };
}

/**
 * The record at `pos`: its entry, { incomplete } if the file ends inside it (judged by its header
 * if that is plausible), or the reason it is bad.
 */
async function readRecord(reader: ChunkReader, pos: number, lunSize: number): Promise<{ entry: JournalEntry } | { incomplete: true } | string> {
  const hb = await reader.get(pos, RECORD_HEADER_SIZE);
  if (!hb) return { incomplete: true };
  const h = readRecordHeader(hb, 0);
  if (h.magic !== RECORD_MAGIC) return `bad record magic 0x${hex(h.magic)}`;
  const implausible = implausibleHeader(h, lunSize);
  if (implausible) return `implausible record header (${implausible})`;
  if (pos + RECORD_HEADER_SIZE + h.dataLen > reader.size) return { incomplete: true };
  let crc = crc32c(hb.subarray(0, RECORD_CRC_OFFSET));
  if (h.dataLen > 0) crc = crc32c((await reader.get(pos + RECORD_HEADER_SIZE, h.dataLen))!, crc);
  crc >>>= 0;
  if (crc !== h.crc) return `CRC mismatch in record seq ${h.seq} (stored 0x${hex(h.crc)}, computed 0x${hex(crc)})`;
  return {
    entry: {
      seq: h.seq, dep: h.dep, kind: h.kind, flags: h.flags, offset: h.offset, length: h.length,
      dataPos: pos + RECORD_HEADER_SIZE, timeMs: h.timeMs, recordBytes: RECORD_HEADER_SIZE + h.dataLen,
    },
  };
}

/** Why a header with the right magic cannot be a record this code wrote, or null. */
function implausibleHeader(h: RecordHeader, lunSize: number): string | null {
  if (h.kind !== JOURNAL_KIND.WRITE && h.kind !== JOURNAL_KIND.WRITE_ZEROES) return `kind ${h.kind}`;
  if ((h.flags & ~KNOWN_FLAGS) !== 0) return `flags 0x${h.flags.toString(16)}`;
  if (h.reserved !== 0) return `reserved 0x${h.reserved.toString(16)}`;
  if (h.seq < 0 || h.dep < 0 || h.timeMs < 0 || h.offset < 0) return 'u64 field beyond 2^53';
  if (h.offset + h.length > lunSize) return `range ${h.offset}+${h.length} beyond the LUN's ${lunSize} bytes`;
  const want = h.kind === JOURNAL_KIND.WRITE ? h.length : 0;
  if (h.dataLen !== want) return `dataLen ${h.dataLen} for ${h.kind === JOURNAL_KIND.WRITE ? 'WRITE' : 'WRITE_ZEROES'} of ${h.length} bytes`;
  return null;
}

/** End of the bad record at `pos`: its declared extent if its header is plausible, else just its header. */
function readExtent(hb: Buffer | null, lunSize: number, pos: number): number {
  if (hb) {
    const h = readRecordHeader(hb, 0);
    if (h.magic === RECORD_MAGIC && !implausibleHeader(h, lunSize)) return pos + RECORD_HEADER_SIZE + h.dataLen;
  }
  return pos + RECORD_HEADER_SIZE;
}

/** Copy the whole journal to `${path}.corrupt-<ms>` (durably) before it is cut. */
export async function saveCopy(path: string): Promise<string> {
  for (let i = 0; ; i++) {
    const savedAs = `${path}.corrupt-${Date.now()}${i ? `-${i}` : ''}`;
    try {
      await fs.promises.copyFile(path, savedAs, fs.constants.COPYFILE_EXCL);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST' && i < 100) continue;
      throw err;
    }
    await fs.promises.chmod(savedAs, 0o600);
    const fd = await openFile(savedAs, fs.constants.O_RDONLY);
    try {
      await fdatasync(fd);
    } finally {
      await closeFd(fd);
    }
    await fsyncDir(dirname(path));
    return savedAs;
  }
}

/** Sequential reads through one reusable buffer. Views it returns are valid until the next call. */
class ChunkReader {
  private buf = Buffer.allocUnsafe(SCAN_CHUNK);
  private start = 0;
  private len = 0;

  constructor(private readonly fd: number, readonly size: number) {}

  /** [pos, pos+n) or null if the file ends before. */
  async get(pos: number, n: number): Promise<Buffer | null> {
    if (pos + n > this.size) return null;
    if (pos >= this.start && pos + n <= this.start + this.len) return this.buf.subarray(pos - this.start, pos - this.start + n);
    if (n > this.buf.length) this.buf = Buffer.allocUnsafe(n);
    const want = Math.min(this.buf.length, this.size - pos);
    this.start = pos;
    this.len = await preadFull(this.fd, this.buf, 0, want, pos);
    if (this.len < n) return null;   // the file shrank under us
    return this.buf.subarray(0, n);
  }

  /** True if every byte from `pos` to the end is zero. */
  async zerosFrom(pos: number): Promise<boolean> {
    for (let at = pos; at < this.size;) {
      const n = Math.min(SCAN_CHUNK, this.size - at);
      const b = await this.get(at, n);
      if (!b) return false;
      for (let i = 0; i < n; i++) if (b[i] !== 0) return false;
      at += n;
    }
    return true;
  }
}

/** What open() found. `records`/`bytes`: the records kept (bytes after the file header). */
export interface JournalRecovery {
  records: number;
  bytes: number;
  /** Bytes of an incomplete last record (or zero-filled tail) that were cut off. */
  tornTailBytes: number;
  /** A bad record with more data behind it: the journal was cut there, the original file saved. */
  corrupt: null | { offset: number; reason: string; savedAs: string };
}

/**
 * Scan the journal `fd` (`size` bytes, header of `headerLen` bytes checked) and cut it after its
 * last good record: a torn tail is dropped, corruption is cut off after a copy of the file is
 * saved. Returns the records kept (in seq order) and the new size.
 */
export async function recoverJournal(fd: number, path: string, size: number, headerLen: number, lunSize: number):
  Promise<{ entries: JournalEntry[]; recovery: JournalRecovery; size: number }> {
  const scan = await scanRecords(fd, headerLen, size, lunSize);
  const recovery: JournalRecovery = { records: 0, bytes: 0, tornTailBytes: 0, corrupt: null };
  if (scan.bad) {
    if (scan.bad.corrupt) {
      const savedAs = await saveCopy(path);
      recovery.corrupt = {
        offset: scan.bad.offset,
        reason: `${scan.bad.reason}; ${size - scan.bad.offset} bytes from there on were cut off the journal (kept in ${savedAs})`,
        savedAs,
      };
    } else {
      recovery.tornTailBytes = size - scan.bad.offset;
    }
    await ftruncate(fd, scan.bad.offset);
    await fdatasync(fd);
    size = scan.bad.offset;
  }
  scan.entries.sort((a, b) => a.seq - b.seq);
  recovery.records = scan.entries.length;
  recovery.bytes = size - headerLen;
  return { entries: scan.entries, recovery, size };
}
