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
import { crc32c } from '@node-rs/crc32';
import { closeFd, fdatasync, fstatSize, ftruncate, openFile, openOrCreate, preadFull, pwritevFull } from './file-io.js';
import { NbdMirrorError } from '../errors.js';
import {
  checkJournalHeader, encodeJournalHeader, recoverJournal, scanRecords, type JournalEntry, type JournalRecovery,
} from './journal-scan.js';
import {
  JOURNAL_KIND, KNOWN_RECORD_FLAGS as KNOWN_FLAGS, MAX_LUN_NAME_BYTES, RECORD_CRC_OFFSET, RECORD_HEADER_SIZE,
  RECORD_MAGIC, writeRecordHeader, type RecordHeader,
} from './record.js';
import { GroupSync, SerialWriter, WRITEV_MAX_BYTES, WRITEV_MAX_RECORDS } from './serial-writer.js';

export { JOURNAL_KIND, RECORD_FLAG } from './record.js';
export type { JournalEntry, JournalRecovery } from './journal-scan.js';

/** A mirror request to journal. For WRITE, `data` holds `length` bytes; for WRITE_ZEROES it is null. */
export interface JournalRecord { seq: number; dep: number; kind: number; flags: number; offset: number; length: number; data: Buffer | null }

export class JournalError extends NbdMirrorError { override readonly code = 'journal'; }

interface PendingAppend {
  hdr: Buffer;
  data: Buffer | null;
  entry: JournalEntry;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class Journal {
  /** Sorted by seq (ties: append order). */
  private index: JournalEntry[] = [];
  private oldest: number | null = null;
  /** File size covered by completed writes (the next record goes here). */
  private end: number;
  /** Appends (batched into one writev) and barriers (reset, close), one at a time; holds the failure latch. */
  private readonly writer: SerialWriter<PendingAppend>;
  /** Counts completed writes; GroupSync compares it to decide what an fdatasync covers. */
  private writeGen = 0;
  private readonly syncer: GroupSync;
  private readers = 0;
  private readersIdle: (() => void)[] = [];
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
    this.writer = new SerialWriter<PendingAppend>({
      write: (batch) => this.writeBatch(batch),
      refuse: (p, failure) => p.reject(new JournalError(`journal ${this.path}: the journal failed: ${failure.message}`)),
      maxItems: WRITEV_MAX_RECORDS,
      maxBytes: WRITEV_MAX_BYTES,
      bytes: (p) => p.entry.recordBytes,
    });
  }

  /** Set when the file's state is no longer known (failed fdatasync, failed roll-back). */
  private get failure(): Error | null { return this.writer.failure; }

  /**
   * Open (or create) the journal of LUN `lunName` (`lunSize` bytes) and recover it: drop a torn
   * tail, cut at (and report) a corrupt record. A header for another LUN, size or format throws.
   */
  static async open(path: string, lunName: string, lunSize: number): Promise<{ journal: Journal; recovery: JournalRecovery }> {
    if (!Number.isSafeInteger(lunSize) || lunSize < 0) throw new JournalError(`journal ${path}: invalid LUN size ${lunSize}`);
    const name = Buffer.from(lunName, 'utf8');
    if (name.length > MAX_LUN_NAME_BYTES) throw new JournalError(`journal ${path}: LUN name longer than ${MAX_LUN_NAME_BYTES} bytes`);
    const header = encodeJournalHeader(name, lunSize);

    const opened = await openOrCreate(path, header);
    const fd = opened.fd;
    try {
      if (!opened.fresh) await checkJournalHeader(fd, opened.size, name, lunName, lunSize, (what) => new JournalError(`journal ${path}: ${what}`));
      const { entries, recovery, size } = await recoverJournal(fd, path, opened.size, header.length, lunSize);
      const journal = new Journal(path, lunName, lunSize, fd, header.length, entries, size);
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
      await checkJournalHeader(fd, size, name, lunName, lunSize, (what) => new JournalError(`journal ${path}: ${what}`));
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
      this.writer.enqueue({ hdr, data: dataLen > 0 ? rec.data : null, entry, resolve, reject });
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
    return this.writer.barrier(async () => {
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
      await this.writer.barrier(async () => undefined);   // every queued append written (or refused)
      await this.syncer.idle();
      if (this.readers > 0) await new Promise<void>((resolve) => this.readersIdle.push(resolve));
      let err: unknown = null;
      if (!this.failure) await fdatasync(this.fd).catch((e: unknown) => { err = e; });
      await closeFd(this.fd);
      if (err) throw err;
    })();
    return this.closing;
  }

  // ---- the writer's batch: one writev at the end of the file ----------------------------------

  private writeBatch(batch: PendingAppend[]): Promise<void> {
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
      if (err) for (const p of batch) p.reject(err);
      else for (const p of batch) p.resolve();
    };
    return pwritevFull(this.fd, bufs, start).then(() => {
      this.end = pos;
      this.writeGen++;
      for (const p of batch) this.insert(p.entry);
      done(null);
    }, (err: Error) => {
      // Cut off whatever part of the batch reached the file; the journal stays as it was.
      return ftruncate(this.fd, start).then(
        () => done(new JournalError(`journal ${this.path}: append failed: ${err.message}`)),
        (terr: Error) => {
          const failure = this.writer.latch.latch(new Error(`append failed (${err.message}) and could not be undone (${terr.message})`));
          done(new JournalError(`journal ${this.path}: ${failure.message}`));
        });
    });
  }

  private async fdatasyncOrFail(): Promise<void> {
    try {
      await fdatasync(this.fd);
    } catch (err) {
      // After a failed fdatasync the kernel may have dropped the dirty pages: nothing written is certain.
      const failure = this.writer.latch.latch(new Error(`fdatasync failed: ${(err as Error).message}`));
      throw new JournalError(`journal ${this.path}: ${failure.message}`);
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
