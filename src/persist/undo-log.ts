// The undo log of a secondary LUN (format: docs/journal-format.md, "Undo log").
//
// While a secondary is inconsistent (bitmap resync or initial sync in progress: regions are
// overwritten in no particular order), every region's contents are saved here *before* the
// first write to it since consistency was lost. If the sync is interrupted and this secondary is
// promoted, rollback() writes the saved contents back: the LUN returns exactly to its last
// consistent state. When the sync completes, discard() drops the log.
//
// Invariants:
// - A region is saved at most once per epoch (an epoch ends with discard() or rollback()), so a
//   record always holds the region's contents from before any write of the epoch.
// - A region counts as saved (covers(), `saved`) only once its record is durable (fdatasync
//   completed); protect() resolves only then. Records are appended by one writer, one batch at a
//   time (one writev, then one fdatasync: group commit).
// - open() verifies every record (CRC). A file that ends inside a record, or whose last bytes
//   are all zeros, has a torn tail (a crash during an append): it is cut off. Any other bad
//   record is an error naming its offset, and the file is left untouched: a record of a region
//   that may have been overwritten since is never dropped silently.
import fs from 'node:fs';
import { crc32c } from '@node-rs/crc32';
import lo from 'buffer-layout';
import { NbdMirrorError } from '../errors.js';
import type { Backing } from '../storage/backing.js';
import {
  closeFd, createFileAtomic, fdatasync, fstatSize, ftruncate, openFile, preadFull, pwriteFull, pwritevFull,
} from './record.js';

export class UndoLogError extends NbdMirrorError { override readonly code = 'undo-log'; }

// ---- layout -----------------------------------------------------------------------------------

export const UNDO_MAGIC = Buffer.from('NBDMUND1', 'latin1');
export const UNDO_VERSION = 1;
export const DEFAULT_UNDO_GRANULARITY = 64 * 1024;
const MIN_GRANULARITY = 512;
const MAX_GRANULARITY = 1 << 30;
const MAX_LUN_NAME_BYTES = 0xffff;

export interface UndoHeaderFixed { magic: Buffer; version: number; lunSize: number; granularity: number; nameLen: number }
/** Followed by `nameLen` bytes of LUN name (UTF-8), then a u32 CRC of every header byte before it. */
export const undoHeaderFixed = lo.struct<UndoHeaderFixed>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.nu64be('lunSize'), lo.u32be('granularity'), lo.u16be('nameLen'),
]);
const undoHeaderCrc = lo.u32be('headerCrc');

export function undoHeaderSize(nameBytes: number): number {
  return undoHeaderFixed.span + nameBytes + undoHeaderCrc.span;
}

export const UNDO_RECORD_MAGIC = 0x4e4d5531;   // "NMU1"
export interface UndoRecordHeader { magic: number; region: number; length: number; crc: number }
/** Followed by `length` bytes: the region's old contents. `crc`: over header bytes 0..15, then the data. */
export const undoRecordHeader = lo.struct<UndoRecordHeader>([
  lo.u32be('magic'), lo.nu64be('region'), lo.u32be('length'), lo.u32be('crc'),
]);
export const UNDO_RECORD_HEADER_SIZE = 20;
const UNDO_RECORD_CRC_OFFSET = 16;

/** A batch carries at most this many records (2 iovecs each: IOV_MAX is 1024)... */
const MAX_BATCH_RECORDS = 512;
/** ...and stops growing once it holds this many bytes. */
const MAX_BATCH_BYTES = 16 * 1024 * 1024;
/** Records are read (open, rollback) in chunks of this size (a larger record is read whole). */
const READ_CHUNK = 4 * 1024 * 1024;

const RESOLVED = Promise.resolve();

// ---- the log ----------------------------------------------------------------------------------

/** The regions one protect() call saves; its callers (and overlapping ones) wait on `promise`. */
interface SaveGroup {
  epoch: number;
  regions: number[];
  /** Records not yet durable. */
  left: number;
  settled: boolean;
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

interface QueuedRecord { hdr: Buffer; data: Buffer; region: number; group: SaveGroup }
interface Barrier { run: () => Promise<void>; resolve: () => void; reject: (err: Error) => void }
type QueueItem = QueuedRecord | Barrier;

export class UndoLog {
  readonly regions: number;
  private savedCount = 0;
  /** File size covered by completed appends (the next record goes here). */
  private end: number;
  /** Regions in flight (being read, queued or written) in this epoch. */
  private pending = new Map<number, SaveGroup>();
  /** Bumped by discard()/rollback(): saves started before that are not recorded. */
  private epoch = 0;
  /** Saves of epochs below this one were cut short by a rollback. */
  private rolledBackBefore = 0;
  private queue: QueueItem[] = [];
  private writing = false;
  private rollingBack = false;
  /** Set when the file's state is no longer known (failed fdatasync or roll-back of an append). */
  private failure: Error | null = null;
  private closing: Promise<void> | null = null;

  private constructor(
    readonly path: string,
    readonly lunName: string,
    readonly lunSize: number,
    readonly granularity: number,
    private readonly fd: number,
    private readonly headerSize: number,
    /** Bit r (byte r>>>3, value 1<<(r&7)): region r has a durable record. */
    private readonly bits: Uint8Array,
    savedCount: number,
    fileEnd: number,
  ) {
    this.regions = regionCount(lunSize, granularity);
    this.savedCount = savedCount;
    this.end = fileEnd;
  }

  /**
   * Open (or create, empty) the undo log of LUN `lunName` (`lunSize` bytes) and rebuild the set
   * of saved regions from it: a torn tail is cut off; a corrupt record, or a header for another
   * LUN name, size or granularity, throws UndoLogError (the file is left as it is).
   */
  static async open(path: string, lunName: string, lunSize: number, granularity: number = DEFAULT_UNDO_GRANULARITY): Promise<UndoLog> {
    const fail = (what: string) => new UndoLogError(`undo log ${path}: ${what}`);
    if (!Number.isSafeInteger(lunSize) || lunSize < 0) throw fail(`invalid LUN size ${lunSize}`);
    if (!Number.isInteger(granularity) || granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY
      || (granularity & (granularity - 1)) !== 0) {
      throw fail(`invalid granularity ${granularity} (a power of two from ${MIN_GRANULARITY} to ${MAX_GRANULARITY})`);
    }
    const regions = regionCount(lunSize, granularity);
    if (regions > 0xffffffff) throw fail(`${regions} regions is too many; use a larger granularity`);
    const name = Buffer.from(lunName, 'utf8');
    if (name.length > MAX_LUN_NAME_BYTES) throw fail(`LUN name longer than ${MAX_LUN_NAME_BYTES} bytes`);
    const header = encodeHeader(name, lunSize, granularity);
    const geo: Geometry = { lunSize, granularity, regions };

    const fd = await openOrCreate(path, header);
    try {
      let size = await fstatSize(fd);
      if (size === 0) {
        // Only a file created empty by someone else looks like this (we create atomically).
        await pwriteFull(fd, header, 0);
        await fdatasync(fd);
        size = header.length;
      } else {
        await checkHeader(fd, path, size, name, lunName, lunSize, granularity);
      }
      const bits = new Uint8Array(Math.ceil(regions / 8));
      let count = 0;
      const bad = await walkRecords(fd, header.length, size, geo, (recs) => {
        for (const r of recs) {
          const k = r.region >>> 3;
          const m = 1 << (r.region & 7);
          if ((bits[k] & m) !== 0) continue;   // never written twice by this code; the first one counts
          bits[k] |= m;
          count++;
        }
      });
      if (bad) {
        if (!bad.incomplete && !(await zerosFrom(fd, bad.offset, size))) {
          throw fail(`corrupt record at offset ${bad.offset}: ${bad.reason}; the log cannot be used (the file was left as it is; `
            + `only if the host lost power while this record was being appended is it safe to cut the file to ${bad.offset} bytes)`);
        }
        // Torn tail: an append cut short by a crash. Its protect() never resolved: nothing relies on it.
        await ftruncate(fd, bad.offset);
        await fdatasync(fd);
        size = bad.offset;
      }
      return new UndoLog(path, lunName, lunSize, granularity, fd, header.length, bits, count, size);
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      throw err;
    }
  }

  /** Regions with a durable record. */
  get saved(): number { return this.savedCount; }
  /** File size in bytes (header included). */
  get bytes(): number { return this.end; }

  /** True if every region the range touches (clipped to the LUN) has a durable record. */
  covers(offset: number, length: number): boolean {
    const range = this.regionRange(offset, length);
    if (!range) return false;
    const bits = this.bits;
    for (let r = range[0]; r < range[1]; r++) if ((bits[r >>> 3] & (1 << (r & 7))) === 0) return false;
    return true;
  }

  /**
   * Call before writing [offset, offset+length) to `backing` (and before zeroing or trimming it):
   * saves the old contents of every region of the range (clipped to the LUN) not saved yet and
   * resolves once all of them are durable. Concurrent calls share regions in flight: a region is
   * read and saved once.
   */
  protect(backing: Backing, offset: number, length: number): Promise<void> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    if (backing.size !== this.lunSize) {
      return Promise.reject(this.error(`backing ${backing.path} has ${backing.size} bytes, the LUN ${this.lunSize}`));
    }
    const range = this.regionRange(offset, length);
    if (!range) return Promise.reject(this.error(`invalid range ${offset}+${length}`));
    const bits = this.bits;
    let waits: Set<SaveGroup> | null = null;
    let fresh: number[] | null = null;
    for (let r = range[0]; r < range[1]; r++) {
      if ((bits[r >>> 3] & (1 << (r & 7))) !== 0) continue;
      const g = this.pending.get(r);
      if (g) (waits ??= new Set()).add(g);
      else (fresh ??= []).push(r);
    }
    if (fresh) {
      const g = newGroup(this.epoch, fresh);
      for (const r of fresh) this.pending.set(r, g);
      (waits ??= new Set()).add(g);
      void this.save(backing, g);
    }
    if (!waits) return RESOLVED;
    if (waits.size === 1) return waits.values().next().value!.promise;
    return Promise.all([...waits].map((g) => g.promise)).then(() => undefined);
  }

  /**
   * Write every saved region back to `backing` (records are CRC-checked again first, one by
   * one), flush the backing, then discard the log. Returns the number of regions restored. A
   * crash or error in the middle leaves the log as it was: calling rollback() again gives the
   * same result. protect() is refused while it runs.
   */
  rollback(backing: Backing): Promise<number> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    if (backing.size !== this.lunSize) {
      return Promise.reject(this.error(`backing ${backing.path} has ${backing.size} bytes, the LUN ${this.lunSize}`));
    }
    this.rollingBack = true;
    let restored = 0;
    const run = this.barrier(async () => {
      if (this.failure) throw this.error(`the log failed (${this.failure.message}); reopen it to roll back`);
      const done = new Uint8Array(this.bits.length);
      const geo: Geometry = { lunSize: this.lunSize, granularity: this.granularity, regions: this.regions };
      const bad = await walkRecords(this.fd, this.headerSize, this.end, geo, async (recs) => {
        const writes: Promise<void>[] = [];
        for (const r of recs) {
          const k = r.region >>> 3;
          const m = 1 << (r.region & 7);
          if ((done[k] & m) !== 0) continue;   // only the first (oldest) record of a region counts
          done[k] |= m;
          writes.push(backing.write(r.data, r.region * this.granularity));
          restored++;
        }
        await Promise.all(writes);
      });
      if (bad) {
        throw this.error(`rollback stopped at offset ${bad.offset}: ${bad.reason} (${restored} regions were written back; `
          + 'the log is unchanged)');
      }
      await backing.flush();
      await this.truncateAll();
      // Saves started before the rollback that finish after it are refused, not recorded.
      this.newEpoch();
      this.rolledBackBefore = this.epoch;
    });
    return run.then(() => restored).finally(() => { this.rollingBack = false; });
  }

  /**
   * Forget every saved region (the state they protected is no longer needed): truncate the file
   * to its header and fsync. Saves still in flight from before the call are not kept. Call it
   * once the sync has completed and no protect() is outstanding.
   */
  discard(): Promise<void> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    this.newEpoch();
    return this.barrier(async () => {
      if (this.failure) throw this.error(`the log failed: ${this.failure.message}`);
      await this.truncateAll();
    });
  }

  /** Wait for the appends in flight, then close. Later calls reject. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.barrier(async () => undefined).catch(() => undefined);
      await closeFd(this.fd);
    })();
    return this.closing;
  }

  // ---- internals --------------------------------------------------------------------------------

  /** [first, end) regions of a range clipped to the LUN; null for an invalid range. */
  private regionRange(offset: number, length: number): [number, number] | null {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) return null;
    const end = Math.min(offset + length, this.lunSize);
    if (offset >= end) return [0, 0];
    return [Math.floor(offset / this.granularity), Math.floor((end - 1) / this.granularity) + 1];
  }

  private error(what: string): UndoLogError {
    return new UndoLogError(`undo log ${this.path}: ${what}`);
  }

  private refusal(): UndoLogError | null {
    if (this.closing) return this.error('the log is closed');
    if (this.failure) return this.error(`the log failed: ${this.failure.message}`);
    if (this.rollingBack) return this.error('a rollback is in progress');
    return null;
  }

  /** Forget the in-memory state: saves in flight from before will not be recorded. */
  private newEpoch(): void {
    this.epoch++;
    this.bits.fill(0);
    this.savedCount = 0;
    this.pending = new Map();
  }

  /** Cut the file to its header and make that durable (runs as a barrier). */
  private async truncateAll(): Promise<void> {
    try {
      await ftruncate(this.fd, this.headerSize);
      this.end = this.headerSize;
      await fdatasync(this.fd);
    } catch (err) {
      this.failure ??= new Error(`truncation failed: ${(err as Error).message}`);
      throw this.error(this.failure.message);
    }
  }

  /** Read the group's regions from the backing and queue their records. */
  private async save(backing: Backing, g: SaveGroup): Promise<void> {
    let datas: Buffer[];
    try {
      datas = await Promise.all(g.regions.map(async (r) => {
        const data = Buffer.allocUnsafe(this.regionLength(r));
        await backing.read(data, r * this.granularity);
        return data;
      }));
    } catch (err) {
      this.failGroup(g, this.error(`reading the old contents of regions ${g.regions[0]}..${g.regions[g.regions.length - 1]} `
        + `failed: ${(err as Error).message}`));
      return;
    }
    if (g.epoch < this.rolledBackBefore) {
      settle(g, this.error('the log was rolled back while this region was being saved'));
      return;
    }
    if (g.epoch !== this.epoch) {
      // discard() came in between: what this save protected is no longer wanted.
      settle(g, null);
      return;
    }
    const refused = this.refusal();
    if (refused) {
      this.failGroup(g, refused);
      return;
    }
    g.left = datas.length;
    for (let i = 0; i < datas.length; i++) {
      const data = datas[i];
      const hdr = Buffer.alloc(UNDO_RECORD_HEADER_SIZE);
      undoRecordHeader.encode({ magic: UNDO_RECORD_MAGIC, region: g.regions[i], length: data.length, crc: 0 }, hdr);
      const crc = crc32c(data, crc32c(hdr.subarray(0, UNDO_RECORD_CRC_OFFSET))) >>> 0;
      hdr.writeUInt32BE(crc, UNDO_RECORD_CRC_OFFSET);
      this.queue.push({ hdr, data, region: g.regions[i], group: g });
    }
    this.pump();
  }

  private failGroup(g: SaveGroup, err: Error): void {
    if (g.epoch === this.epoch) for (const r of g.regions) if (this.pending.get(r) === g) this.pending.delete(r);
    settle(g, err);
  }

  private regionLength(r: number): number {
    return Math.min(this.granularity, this.lunSize - r * this.granularity);
  }

  private barrier(run: () => Promise<void>): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ run, resolve, reject });
      this.pump();
    });
  }

  /** The writer: one batch (writev + fdatasync) or barrier at a time, in queue order. */
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
      let n = 0;
      let bytes = 0;
      while (n < this.queue.length && n < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES) {
        const item = this.queue[n];
        if ('run' in item) break;
        bytes += item.hdr.length + item.data.length;
        n++;
      }
      const batch = this.queue.splice(0, n) as QueuedRecord[];
      const live = batch.filter((rec) => !rec.group.settled);   // a failed group's other records are dropped
      if (live.length === 0) continue;
      if (this.failure) {
        for (const rec of live) this.failGroup(rec.group, this.error(`the log failed: ${this.failure.message}`));
        continue;
      }
      this.writing = true;
      void this.writeBatch(live).finally(() => {
        this.writing = false;
        this.pump();
      });
      return;
    }
  }

  private async writeBatch(batch: QueuedRecord[]): Promise<void> {
    const start = this.end;
    const bufs: Buffer[] = [];
    let len = 0;
    for (const rec of batch) {
      bufs.push(rec.hdr, rec.data);
      len += rec.hdr.length + rec.data.length;
    }
    try {
      await pwritevFull(this.fd, bufs, start);
    } catch (err) {
      // Cut off whatever part of the batch reached the file; the log stays as it was.
      try {
        await ftruncate(this.fd, start);
      } catch (terr) {
        this.failure ??= new Error(`append failed (${(err as Error).message}) and could not be undone (${(terr as Error).message})`);
      }
      const e = this.error(`append failed: ${(err as Error).message}`);
      for (const rec of batch) this.failGroup(rec.group, e);
      return;
    }
    this.end = start + len;
    try {
      await fdatasync(this.fd);
    } catch (err) {
      // The kernel may have dropped the dirty pages: what the file holds is no longer known.
      this.failure ??= new Error(`fdatasync failed: ${(err as Error).message}`);
      const e = this.error(this.failure.message);
      for (const rec of batch) this.failGroup(rec.group, e);
      return;
    }
    for (const rec of batch) {
      const g = rec.group;
      if (g.settled) continue;
      if (g.epoch === this.epoch) {
        const k = rec.region >>> 3;
        const m = 1 << (rec.region & 7);
        if ((this.bits[k] & m) === 0) {
          this.bits[k] |= m;
          this.savedCount++;
        }
        if (this.pending.get(rec.region) === g) this.pending.delete(rec.region);
      }
      if (--g.left === 0) settle(g, null);
    }
  }
}

// ---- helpers ----------------------------------------------------------------------------------

interface Geometry { lunSize: number; granularity: number; regions: number }

function regionCount(lunSize: number, granularity: number): number {
  return Math.ceil(lunSize / granularity);
}

function newGroup(epoch: number, regions: number[]): SaveGroup {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => undefined);   // the callers handle it; this only avoids an unhandled rejection
  return { epoch, regions, left: regions.length, settled: false, promise, resolve, reject };
}

function settle(g: SaveGroup, err: Error | null): void {
  if (g.settled) return;
  g.settled = true;
  if (err) g.reject(err);
  else g.resolve();
}

function encodeHeader(name: Buffer, lunSize: number, granularity: number): Buffer {
  const buf = Buffer.alloc(undoHeaderSize(name.length));
  undoHeaderFixed.encode({ magic: UNDO_MAGIC, version: UNDO_VERSION, lunSize, granularity, nameLen: name.length }, buf);
  name.copy(buf, undoHeaderFixed.span);
  const at = undoHeaderFixed.span + name.length;
  undoHeaderCrc.encode(crc32c(buf.subarray(0, at)) >>> 0, buf, at);
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
      await createFileAtomic(path, header);   // mode 0600
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}

async function checkHeader(fd: number, path: string, size: number, name: Buffer, lunName: string, lunSize: number, granularity: number): Promise<void> {
  const fail = (what: string) => new UndoLogError(`undo log ${path}: ${what}`);
  const fixedSpan = undoHeaderFixed.span;
  const fixed = Buffer.alloc(fixedSpan);
  if (await preadFull(fd, fixed, 0, fixedSpan, 0) < fixedSpan) {
    throw fail(`file of ${size} bytes is shorter than an undo log header (not an undo log, or truncated)`);
  }
  const f = undoHeaderFixed.decode(fixed);
  if (!f.magic.equals(UNDO_MAGIC)) throw fail(`not an undo log (bad magic ${JSON.stringify(f.magic.toString('latin1'))})`);
  if (f.version !== UNDO_VERSION) throw fail(`undo log format version ${f.version}, this build reads version ${UNDO_VERSION}`);
  const total = undoHeaderSize(f.nameLen);
  const full = Buffer.alloc(total);
  if (await preadFull(fd, full, 0, total, 0) < total) throw fail(`truncated header (${size} bytes, header needs ${total})`);
  const stored = full.readUInt32BE(total - 4);
  const actual = crc32c(full.subarray(0, total - 4)) >>> 0;
  if (stored !== actual) throw fail(`header CRC mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)}): corrupt header`);
  const storedName = full.subarray(fixedSpan, fixedSpan + f.nameLen);
  if (!storedName.equals(name)) {
    throw fail(`belongs to LUN ${JSON.stringify(storedName.toString('utf8'))}, not ${JSON.stringify(lunName)}`);
  }
  if (f.lunSize !== lunSize) throw fail(`was written for a LUN of ${f.lunSize} bytes, LUN ${JSON.stringify(lunName)} has ${lunSize}`);
  if (f.granularity !== granularity) throw fail(`was written with a granularity of ${f.granularity} bytes, not ${granularity}`);
}

interface WalkedRecord { region: number; data: Buffer }
/** Where walkRecords() stopped. `incomplete`: the file ends inside the record (by its header, if plausible). */
interface BadSpot { offset: number; reason: string; incomplete: boolean }

/**
 * Read the records in [from, end), in file order, checking each (magic, plausible header, CRC),
 * in chunks: `visit` gets the valid records of each chunk (their data are fresh views, valid
 * after it returns). Stops at the first record that is not valid and returns where; null if
 * every record to `end` is valid.
 */
async function walkRecords(fd: number, from: number, end: number, geo: Geometry,
  visit: (recs: WalkedRecord[]) => void | Promise<void>): Promise<BadSpot | null> {
  let pos = from;
  let want = READ_CHUNK;
  while (pos < end) {
    const n = Math.min(want, end - pos);
    const buf = Buffer.allocUnsafe(n);
    const got = await preadFull(fd, buf, 0, n, pos);
    if (got < n) return { offset: pos, reason: `short read at ${pos} (the file shrank?)`, incomplete: false };
    const recs: WalkedRecord[] = [];
    let at = 0;
    let bad: BadSpot | null = null;
    want = READ_CHUNK;
    while (at < n) {
      const offset = pos + at;
      if (n - at < UNDO_RECORD_HEADER_SIZE) {
        if (offset + UNDO_RECORD_HEADER_SIZE > end) bad = { offset, reason: 'the file ends inside a record header', incomplete: true };
        break;   // else: read on from here
      }
      const h = undoRecordHeader.decode(buf, at);
      if (h.magic !== UNDO_RECORD_MAGIC) {
        bad = { offset, reason: `bad record magic 0x${hex(h.magic)}`, incomplete: false };
        break;
      }
      if (!(h.region < geo.regions)) {
        bad = { offset, reason: `region ${h.region} beyond the LUN's ${geo.regions} regions`, incomplete: false };
        break;
      }
      const expect = Math.min(geo.granularity, geo.lunSize - h.region * geo.granularity);
      if (h.length !== expect) {
        bad = { offset, reason: `length ${h.length} for region ${h.region}, which has ${expect} bytes`, incomplete: false };
        break;
      }
      const size = UNDO_RECORD_HEADER_SIZE + h.length;
      if (offset + size > end) {
        bad = { offset, reason: `the file ends inside the record of region ${h.region}`, incomplete: true };
        break;
      }
      if (at + size > n) {
        want = Math.max(READ_CHUNK, size);
        break;   // read on from here
      }
      const data = buf.subarray(at + UNDO_RECORD_HEADER_SIZE, at + size);
      const crc = crc32c(data, crc32c(buf.subarray(at, at + UNDO_RECORD_CRC_OFFSET))) >>> 0;
      if (crc !== h.crc) {
        bad = { offset, reason: `CRC mismatch in the record of region ${h.region} (stored 0x${hex(h.crc)}, computed 0x${hex(crc)})`, incomplete: false };
        break;
      }
      recs.push({ region: h.region, data });
      at += size;
    }
    if (recs.length > 0) await visit(recs);
    if (bad) return bad;
    pos += at;
  }
  return null;
}

/** True if every byte of the file from `pos` to `end` is zero. */
async function zerosFrom(fd: number, pos: number, end: number): Promise<boolean> {
  const buf = Buffer.allocUnsafe(READ_CHUNK);
  for (let at = pos; at < end;) {
    const n = Math.min(READ_CHUNK, end - at);
    if (await preadFull(fd, buf, 0, n, at) < n) return false;
    for (let i = 0; i < n; i++) if (buf[i] !== 0) return false;
    at += n;
  }
  return true;
}

function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
}
