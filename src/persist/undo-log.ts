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
import { NbdMirrorError } from '../errors.js';
import type { Backing } from '../storage/backing.js';
import { closeFd, fdatasync, ftruncate, openOrCreate, pwritevFull } from './file-io.js';
import { SerialWriter, WRITEV_MAX_BYTES, WRITEV_MAX_RECORDS } from './serial-writer.js';
import {
  checkUndoHeader, DEFAULT_UNDO_GRANULARITY, encodeUndoHeader, encodeUndoRecordHeader, MAX_LUN_NAME_BYTES, recoverUndoLog,
  regionCount, regionRange, undoGeometry, walkRecords, type Geometry,
} from './undo-records.js';

export {
  DEFAULT_UNDO_GRANULARITY, UNDO_MAGIC, UNDO_RECORD_HEADER_SIZE, UNDO_RECORD_MAGIC, UNDO_VERSION, undoHeaderFixed, undoHeaderSize,
  undoRecordHeader, type UndoHeaderFixed, type UndoRecordHeader,
} from './undo-records.js';

export class UndoLogError extends NbdMirrorError { override readonly code = 'undo-log'; }

const RESOLVED = Promise.resolve();

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
  /** Batches (one writev + fdatasync each) and barriers (rollback, discard, close), one at a time. */
  private readonly writer: SerialWriter<QueuedRecord>;
  private rollingBack = false;
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
    this.writer = new SerialWriter<QueuedRecord>({
      write: (batch) => this.writeBatch(batch),
      refuse: (rec, failure) => this.failGroup(rec.group, this.error(`the log failed: ${failure.message}`)),
      maxItems: WRITEV_MAX_RECORDS,
      maxBytes: WRITEV_MAX_BYTES,
      bytes: (rec) => rec.hdr.length + rec.data.length,
      dropped: (rec) => rec.group.settled,   // a failed group's other records are dropped
    });
  }

  /** Set when the file's state is no longer known (failed fdatasync or roll-back of an append). */
  private get failure(): Error | null { return this.writer.failure; }

  /**
   * Open (or create, empty) the undo log of LUN `lunName` (`lunSize` bytes) and rebuild the set
   * of saved regions from it: a torn tail is cut off; a corrupt record, or a header for another
   * LUN name, size or granularity, throws UndoLogError (the file is left as it is).
   */
  static async open(path: string, lunName: string, lunSize: number, granularity: number = DEFAULT_UNDO_GRANULARITY): Promise<UndoLog> {
    const fail = (what: string) => new UndoLogError(`undo log ${path}: ${what}`);
    const geo = undoGeometry(lunSize, granularity, fail);
    const name = Buffer.from(lunName, 'utf8');
    if (name.length > MAX_LUN_NAME_BYTES) throw fail(`LUN name longer than ${MAX_LUN_NAME_BYTES} bytes`);
    const header = encodeUndoHeader(name, lunSize, granularity);
    const opened = await openOrCreate(path, header);
    const fd = opened.fd;
    try {
      const size = opened.size;
      if (!opened.fresh) await checkUndoHeader(fd, size, name, lunName, lunSize, granularity, fail);
      const { bits, count, size: kept } = await recoverUndoLog(fd, header.length, size, geo, fail);
      return new UndoLog(path, lunName, lunSize, granularity, fd, header.length, bits, count, kept);
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
    const range = regionRange(this.lunSize, this.granularity, offset, length);
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
    const range = regionRange(this.lunSize, this.granularity, offset, length);
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
    const run = this.writer.barrier(async () => {
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
    return this.writer.barrier(async () => {
      if (this.failure) throw this.error(`the log failed: ${this.failure.message}`);
      await this.truncateAll();
    });
  }

  /** Wait for the appends in flight, then close. Later calls reject. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.writer.barrier(async () => undefined).catch(() => undefined);
      await closeFd(this.fd);
    })();
    return this.closing;
  }

  // ---- internals --------------------------------------------------------------------------------

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
      throw this.error(this.writer.latch.latch(new Error(`truncation failed: ${(err as Error).message}`)).message);
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
    const recs: QueuedRecord[] = new Array(datas.length);
    for (let i = 0; i < datas.length; i++) {
      const data = datas[i];
      recs[i] = { hdr: encodeUndoRecordHeader(g.regions[i], data), data, region: g.regions[i], group: g };
    }
    this.writer.enqueueAll(recs);   // one batch: the group's records share a writev and an fdatasync
  }

  private failGroup(g: SaveGroup, err: Error): void {
    if (g.epoch === this.epoch) for (const r of g.regions) if (this.pending.get(r) === g) this.pending.delete(r);
    settle(g, err);
  }

  private regionLength(r: number): number {
    return Math.min(this.granularity, this.lunSize - r * this.granularity);
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
        this.writer.latch.latch(new Error(`append failed (${(err as Error).message}) and could not be undone (${(terr as Error).message})`));
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
      const e = this.error(this.writer.latch.latch(new Error(`fdatasync failed: ${(err as Error).message}`)).message);
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
