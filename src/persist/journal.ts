// The per-LUN persistent mirror journal (format: docs/journal-format.md).
//
// While the peer is unreachable, mirror requests (writes, zeroes) are appended here; after the
// link comes back they are replayed in sequence order, and the whole journal is reclaimed
// (reset()) once the peer has confirmed them durable.
//
// Crash model: appends go to the end of the file with positional writes, one write at a time
// (queued appends are coalesced into one writev), so a SIGKILL leaves every completed append
// intact plus at most a prefix of the write in flight: a torn tail, which open() drops. A record
// that fails its checks with more records behind it is corruption: open() saves a copy of the
// file, truncates the journal there and reports it; it never skips over a bad record.
import fs from 'node:fs';
import { dirname } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { NbdMirrorError } from '../errors.js';
import {
  closeFd, createFileAtomic, fdatasync, fstatSize, fsyncDir, ftruncate, GroupSync, headerCrc, JOURNAL_MAGIC,
  JOURNAL_VERSION, journalHeaderFixed, journalHeaderSize, MAX_LUN_NAME_BYTES, openFile, preadFull, pwriteFull,
  pwritevFull, readRecordHeader, RECORD_CRC_OFFSET, RECORD_HEADER_SIZE, RECORD_MAGIC, writeRecordHeader,
  type RecordHeader,
} from './record.js';

export const JOURNAL_KIND = { WRITE: 1, WRITE_ZEROES: 2 } as const;

/** A mirror request to journal. For WRITE, `data` holds `length` bytes; for WRITE_ZEROES it is null. */
export interface JournalRecord { seq: number; dep: number; kind: number; flags: number; offset: number; length: number; data: Buffer | null }

/** One record of the in-memory index. `dataPos`: file offset of its data; `recordBytes`: header + data. */
export interface JournalEntry {
  seq: number; dep: number; kind: number; flags: number; offset: number; length: number;
  dataPos: number; timeMs: number; recordBytes: number;
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

export class JournalError extends NbdMirrorError { override readonly code = 'journal'; }

// RESYNC: a region copy in flight when the link failed keeps its sequence number in the journal,
// so the replay stays dense (a later record may depend on it).
/** Request flags a record keeps (the mirror wire uses the same values: mirror/wire.ts MIRROR_FLAG). */
export const RECORD_FLAG = { FUA: 1, MAY_PUNCH: 2, RESYNC: 4 } as const;
const KNOWN_FLAGS = RECORD_FLAG.FUA | RECORD_FLAG.MAY_PUNCH | RECORD_FLAG.RESYNC;
/** A coalesced write carries at most this many records (2 iovecs each: IOV_MAX is 1024)... */
const MAX_BATCH_RECORDS = 512;
/** ...and stops adding records once it holds this many bytes. */
const MAX_BATCH_BYTES = 16 * 1024 * 1024;
/** open() reads the journal in chunks of this size (larger records are read whole). */
const SCAN_CHUNK = 4 * 1024 * 1024;

interface PendingAppend {
  hdr: Buffer;
  data: Buffer | null;
  entry: JournalEntry;
  resolve: () => void;
  reject: (err: Error) => void;
}

interface Barrier {
  run: () => Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

type QueueItem = PendingAppend | Barrier;

export class Journal {
  /** Sorted by seq (ties: append order). */
  private index: JournalEntry[] = [];
  private oldest: number | null = null;
  /** File size covered by completed writes (the next record goes here). */
  private end: number;
  private queue: QueueItem[] = [];
  private writing = false;
  /** Counts completed writes; GroupSync compares it to decide what an fdatasync covers. */
  private writeGen = 0;
  private readonly syncer: GroupSync;
  private readers = 0;
  private readersIdle: (() => void)[] = [];
  /** Set when the file's state is no longer known (failed fdatasync, failed roll-back). */
  private failure: Error | null = null;
  private closing: Promise<void> | null = null;

  private constructor(
    readonly path: string,
    readonly lunName: string,
    readonly lunSize: number,
    private readonly fd: number,
    private readonly headerSize: number,
    entries: JournalEntry[],
    fileEnd: number,
  ) {
    this.end = fileEnd;
    this.index = entries;
    for (const e of entries) if (this.oldest === null || e.timeMs < this.oldest) this.oldest = e.timeMs;
    this.syncer = new GroupSync(() => this.fdatasyncOrFail(), () => this.writeGen);
  }

  /**
   * Open (or create) the journal of LUN `lunName` (`lunSize` bytes) and recover it: drop a torn
   * tail, cut at (and report) a corrupt record. A header for another LUN, size or format throws.
   */
  static async open(path: string, lunName: string, lunSize: number): Promise<{ journal: Journal; recovery: JournalRecovery }> {
    if (!Number.isSafeInteger(lunSize) || lunSize < 0) throw new JournalError(`journal ${path}: invalid LUN size ${lunSize}`);
    const name = Buffer.from(lunName, 'utf8');
    if (name.length > MAX_LUN_NAME_BYTES) throw new JournalError(`journal ${path}: LUN name longer than ${MAX_LUN_NAME_BYTES} bytes`);
    const header = encodeJournalHeader(name, lunSize);

    const fd = await openOrCreate(path, header);
    try {
      let size = await fstatSize(fd);
      if (size === 0) {
        // Only a file created empty by someone else looks like this (we create atomically): no LUN's data.
        await pwriteFull(fd, header, 0);
        await fdatasync(fd);
        size = header.length;
      } else {
        await checkHeader(fd, path, size, name, lunName, lunSize);
      }
      const scan = await scanRecords(fd, header.length, size, lunSize);
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
      recovery.bytes = size - header.length;
      const journal = new Journal(path, lunName, lunSize, fd, header.length, scan.entries, size);
      return { journal, recovery };
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Read-only look at a journal (safe while the site runs): its records in seq order and, if a
   * record is bad, where and why. Nothing is truncated or copied.
   */
  static async inspect(path: string, lunName: string, lunSize: number): Promise<{
    entries: JournalEntry[]; bytes: number; bad: null | { offset: number; reason: string; corrupt: boolean };
  }> {
    const name = Buffer.from(lunName, 'utf8');
    const fd = await openFile(path, fs.constants.O_RDONLY);
    try {
      const size = await fstatSize(fd);
      await checkHeader(fd, path, size, name, lunName, lunSize);
      const headerLen = encodeJournalHeader(name, lunSize).length;
      const scan = await scanRecords(fd, headerLen, size, lunSize);
      scan.entries.sort((a, b) => a.seq - b.seq);
      return { entries: scan.entries, bytes: (scan.bad ? scan.bad.offset : size) - headerLen, bad: scan.bad };
    } finally {
      await closeFd(fd).catch(() => undefined);
    }
  }

  /**
   * Append a record. Appends are written in call order; the promise resolves once the record's
   * bytes are in the file (page cache; sync() makes them durable) and it is in entries().
   * `rec.data` must stay unchanged until then.
   */
  append(rec: JournalRecord): Promise<void> {
    const bad = this.closing ? 'the journal is closed' : this.failure ? `the journal failed: ${this.failure.message}` : checkRecord(rec, this.lunSize);
    if (bad) return Promise.reject(new JournalError(`journal ${this.path}: ${bad}`));
    const dataLen = rec.kind === JOURNAL_KIND.WRITE ? rec.length : 0;
    const timeMs = Date.now();
    const h: RecordHeader = {
      magic: RECORD_MAGIC, kind: rec.kind, flags: rec.flags, reserved: 0, seq: rec.seq, dep: rec.dep,
      offset: rec.offset, length: rec.length, dataLen, timeMs, crc: 0,
    };
    const hdr = Buffer.allocUnsafe(RECORD_HEADER_SIZE);
    writeRecordHeader(hdr, 0, h);
    let crc = crc32c(hdr.subarray(0, RECORD_CRC_OFFSET));
    if (dataLen > 0) crc = crc32c(rec.data!, crc);
    hdr.writeUInt32BE(crc >>> 0, RECORD_CRC_OFFSET);
    const entry: JournalEntry = {
      seq: rec.seq, dep: rec.dep, kind: rec.kind, flags: rec.flags, offset: rec.offset, length: rec.length,
      dataPos: 0, timeMs, recordBytes: RECORD_HEADER_SIZE + dataLen,
    };
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ hdr, data: dataLen > 0 ? rec.data : null, entry, resolve, reject });
      this.pump();
    });
  }

  /** Make durable every append that resolved before this call (group commit). */
  sync(): Promise<void> {
    if (this.closing) return Promise.reject(new JournalError(`journal ${this.path}: the journal is closed`));
    if (this.failure) return Promise.reject(new JournalError(`journal ${this.path}: the journal failed: ${this.failure.message}`));
    return this.syncer.sync();
  }

  /**
   * The index, sorted by seq ascending: a live read-only view (O(1)), which later appends update
   * in place. reset() starts a new array; one obtained before keeps the reclaimed entries.
   */
  entries(): readonly JournalEntry[] {
    return this.index;
  }

  /** The data of a WRITE record (a fresh buffer); empty for WRITE_ZEROES. `e` must come from entries(). */
  /**
   * The data of several WRITE records, read with as few reads as their placement allows: records
   * next to each other in the file (the usual case: appended in seq order) come from one read.
   */
  async readDataMany(entries: readonly JournalEntry[]): Promise<Buffer[]> {
    if (this.closing) throw new JournalError(`journal ${this.path}: the journal is closed`);
    const out: Buffer[] = new Array(entries.length);
    let i = 0;
    this.readers++;
    try {
      while (i < entries.length) {
        // A run: each next record starts where the previous one's data ends (one header apart).
        let j = i + 1;
        while (j < entries.length && entries[j].dataPos === entries[j - 1].dataPos + entries[j - 1].recordBytes) j++;
        const first = entries[i];
        const last = entries[j - 1];
        const span = last.dataPos + last.recordBytes - RECORD_HEADER_SIZE - first.dataPos;
        const buf = Buffer.allocUnsafe(span);
        const n = await preadFull(this.fd, buf, 0, span, first.dataPos);
        if (n !== span) throw new JournalError(`journal ${this.path}: short read at ${first.dataPos} (${n} of ${span} bytes)`);
        for (let k = i; k < j; k++) {
          const e = entries[k];
          if (!this.contains(e)) throw new JournalError(`journal ${this.path}: seq ${e.seq} is not in the journal (reset since?)`);
          const at = e.dataPos - first.dataPos;
          out[k] = buf.subarray(at, at + e.recordBytes - RECORD_HEADER_SIZE);
        }
        i = j;
      }
    } finally {
      if (--this.readers === 0) for (const w of this.readersIdle.splice(0)) w();
    }
    return out;
  }

  async readData(e: JournalEntry): Promise<Buffer> {
    if (this.closing) throw new JournalError(`journal ${this.path}: the journal is closed`);
    if (!this.contains(e)) throw new JournalError(`journal ${this.path}: seq ${e.seq} is not in the journal (reset since?)`);
    const len = e.recordBytes - RECORD_HEADER_SIZE;
    const buf = Buffer.allocUnsafe(len);
    this.readers++;
    try {
      const n = await preadFull(this.fd, buf, 0, len, e.dataPos);
      if (n !== len) throw new JournalError(`journal ${this.path}: short read of seq ${e.seq} at ${e.dataPos} (${n} of ${len} bytes)`);
    } finally {
      if (--this.readers === 0) for (const w of this.readersIdle.splice(0)) w();
    }
    return buf;
  }

  /** Bytes of all records in the index (file size minus the header). */
  get bytes(): number { return this.end - this.headerSize; }
  get records(): number { return this.index.length; }
  /** Earliest append time (ms since the epoch) of any record, null if empty. */
  get oldestTimeMs(): number | null { return this.oldest; }
  get maxSeq(): number { return this.index.length ? this.index[this.index.length - 1].seq : 0; }
  get minSeq(): number { return this.index.length ? this.index[0].seq : 0; }

  /**
   * Reclaim every record: once the appends queued before this call are written, truncate to the
   * header, fdatasync, clear the index. Appends made after this call are kept.
   */
  reset(): Promise<void> {
    if (this.closing) return Promise.reject(new JournalError(`journal ${this.path}: the journal is closed`));
    return this.barrier(async () => {
      if (this.failure) throw new JournalError(`journal ${this.path}: the journal failed: ${this.failure.message}`);
      await ftruncate(this.fd, this.headerSize);
      this.end = this.headerSize;
      this.index = [];
      this.oldest = null;
      await this.fdatasyncOrFail();
    });
  }

  /** Write what is queued, fdatasync, close. Later calls (except close) reject. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.barrier(async () => undefined);   // every queued append written (or refused)
      await this.syncer.idle();
      if (this.readers > 0) await new Promise<void>((resolve) => this.readersIdle.push(resolve));
      let err: unknown = null;
      if (!this.failure) await fdatasync(this.fd).catch((e: unknown) => { err = e; });
      await closeFd(this.fd);
      if (err) throw err;
    })();
    return this.closing;
  }

  // ---- the writer: one write (or barrier) at a time, in call order ----------------------------

  private barrier(run: () => Promise<void>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ run, resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    while (!this.writing && this.queue.length > 0) {
      const first = this.queue[0];
      if ('run' in first) {
        this.queue.shift();
        this.writing = true;
        first.run().then(first.resolve, first.reject).finally(() => {
          this.writing = false;
          this.pump();
        });
        return;
      }
      if (this.failure) {   // accepted before the journal failed: refuse now rather than write
        this.queue.shift();
        first.reject(new JournalError(`journal ${this.path}: the journal failed: ${this.failure.message}`));
        continue;
      }
      let n = 0;
      let bytes = 0;
      while (n < this.queue.length && n < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES) {
        const item = this.queue[n];
        if ('run' in item || this.failure) break;
        bytes += item.entry.recordBytes;
        n++;
      }
      const all = n === this.queue.length;
      const batch = (all ? this.queue : this.queue.slice(0, n)) as PendingAppend[];
      this.queue = all ? [] : this.queue.slice(n);
      this.writing = true;
      this.writeBatch(batch);
      return;
    }
  }

  private writeBatch(batch: PendingAppend[]): void {
    const start = this.end;
    const bufs: Buffer[] = [];
    let pos = start;
    for (const p of batch) {
      p.entry.dataPos = pos + RECORD_HEADER_SIZE;
      pos += p.entry.recordBytes;
      bufs.push(p.hdr);
      if (p.data) bufs.push(p.data);
    }
    const done = (err: Error | null): void => {
      this.writing = false;
      if (err) for (const p of batch) p.reject(err);
      else for (const p of batch) p.resolve();
      this.pump();
    };
    pwritevFull(this.fd, bufs, start).then(() => {
      this.end = pos;
      this.writeGen++;
      for (const p of batch) this.insert(p.entry);
      done(null);
    }, (err: Error) => {
      // Cut off whatever part of the batch reached the file; the journal stays as it was.
      ftruncate(this.fd, start).then(
        () => done(new JournalError(`journal ${this.path}: append failed: ${err.message}`)),
        (terr: Error) => {
          this.failure ??= new Error(`append failed (${err.message}) and could not be undone (${terr.message})`);
          done(new JournalError(`journal ${this.path}: ${this.failure.message}`));
        });
    });
  }

  private async fdatasyncOrFail(): Promise<void> {
    try {
      await fdatasync(this.fd);
    } catch (err) {
      // After a failed fdatasync the kernel may have dropped the dirty pages: nothing written is certain.
      this.failure ??= new Error(`fdatasync failed: ${(err as Error).message}`);
      throw new JournalError(`journal ${this.path}: ${this.failure.message}`);
    }
  }

  // ---- the index ------------------------------------------------------------------------------

  private insert(e: JournalEntry): void {
    const a = this.index;
    if (a.length === 0 || a[a.length - 1].seq <= e.seq) {
      a.push(e);
    } else {
      a.splice(upperBound(a, e.seq), 0, e);
    }
    if (this.oldest === null || e.timeMs < this.oldest) this.oldest = e.timeMs;
  }

  private contains(e: JournalEntry): boolean {
    const a = this.index;
    for (let i = lowerBound(a, e.seq); i < a.length && a[i].seq === e.seq; i++) if (a[i] === e) return true;
    return false;
  }
}

/** First index whose seq is >= seq. */
function lowerBound(a: JournalEntry[], seq: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid].seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** First index whose seq is > seq. */
function upperBound(a: JournalEntry[], seq: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid].seq <= seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Why `rec` cannot be journaled, or null. */
function checkRecord(rec: JournalRecord, lunSize: number): string | null {
  if (!Number.isSafeInteger(rec.seq) || rec.seq < 0) return `invalid seq ${rec.seq}`;
  if (!Number.isSafeInteger(rec.dep) || rec.dep < 0) return `invalid dep ${rec.dep} (seq ${rec.seq})`;
  if (!Number.isInteger(rec.flags) || (rec.flags & ~KNOWN_FLAGS) !== 0 || rec.flags < 0) return `invalid flags ${rec.flags} (seq ${rec.seq})`;
  if (!Number.isSafeInteger(rec.offset) || rec.offset < 0 || !Number.isInteger(rec.length) || rec.length < 0
    || rec.length > 0xffffffff || rec.offset + rec.length > lunSize) {
    return `range ${rec.offset}+${rec.length} outside the LUN (${lunSize} bytes) (seq ${rec.seq})`;
  }
  if (rec.kind === JOURNAL_KIND.WRITE) {
    if (!rec.data || rec.data.length !== rec.length) return `WRITE seq ${rec.seq} needs ${rec.length} bytes of data, got ${rec.data ? rec.data.length : 'none'}`;
  } else if (rec.kind === JOURNAL_KIND.WRITE_ZEROES) {
    if (rec.data !== null) return `WRITE_ZEROES seq ${rec.seq} carries data`;
  } else {
    return `unknown record kind ${rec.kind} (seq ${rec.seq})`;
  }
  return null;
}

// ---- open: header, scan, recovery ----------------------------------------------------------

function encodeJournalHeader(name: Buffer, lunSize: number): Buffer {
  const buf = Buffer.alloc(journalHeaderSize(name.length));
  journalHeaderFixed.encode({ magic: JOURNAL_MAGIC, version: JOURNAL_VERSION, lunSize, nameLen: name.length }, buf);
  name.copy(buf, journalHeaderFixed.span);
  const at = journalHeaderFixed.span + name.length;
  headerCrc.encode(crc32c(buf.subarray(0, at)) >>> 0, buf, at);
  return buf;
}

async function openOrCreate(path: string, header: Buffer): Promise<number> {
  for (;;) {
    try {
      return await openFile(path, fs.constants.O_RDWR);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    try {
      await createFileAtomic(path, header);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}

async function checkHeader(fd: number, path: string, size: number, name: Buffer, lunName: string, lunSize: number): Promise<void> {
  const fail = (what: string) => new JournalError(`journal ${path}: ${what}`);
  const fixedSpan = journalHeaderFixed.span;
  const fixed = Buffer.alloc(fixedSpan);
  if (await preadFull(fd, fixed, 0, fixedSpan, 0) < fixedSpan) {
    throw fail(`file of ${size} bytes is shorter than a journal header (not a mirror journal, or truncated)`);
  }
  const f = journalHeaderFixed.decode(fixed);
  if (!f.magic.equals(JOURNAL_MAGIC)) throw fail(`not a mirror journal (bad magic ${JSON.stringify(f.magic.toString('latin1'))})`);
  if (f.version !== JOURNAL_VERSION) throw fail(`journal format version ${f.version}, this build reads version ${JOURNAL_VERSION}`);
  const total = journalHeaderSize(f.nameLen);
  const full = Buffer.alloc(total);
  if (await preadFull(fd, full, 0, total, 0) < total) throw fail(`truncated header (${size} bytes, header needs ${total})`);
  const stored = headerCrc.decode(full, total - headerCrc.span);
  const actual = crc32c(full.subarray(0, total - headerCrc.span)) >>> 0;
  if (stored !== actual) throw fail(`header CRC mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)}): corrupt header`);
  const storedName = full.subarray(fixedSpan, fixedSpan + f.nameLen);
  if (!storedName.equals(name)) {
    throw fail(`belongs to LUN ${JSON.stringify(storedName.toString('utf8'))}, not ${JSON.stringify(lunName)}`);
  }
  if (f.lunSize !== lunSize) {
    throw fail(`was written for LUN ${JSON.stringify(lunName)} of ${f.lunSize} bytes, the LUN now has ${lunSize} bytes`);
  }
}

interface Scan {
  entries: JournalEntry[];
  /** Where the valid records end, if the file goes on after them. */
  bad: null | { offset: number; reason: string; corrupt: boolean };
}

/** Read records from `from` to `size`, stopping at the first one that is incomplete or fails a check. */
async function scanRecords(fd: number, from: number, size: number, lunSize: number): Promise<Scan> {
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
async function saveCopy(path: string): Promise<string> {
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

function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
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
