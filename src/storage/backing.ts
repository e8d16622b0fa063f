// A LUN's backing store: a regular (image) file or a block device, addressed by positional I/O.
// All offsets are Numbers: callers range-check NBD's u64 offsets against `size` first, and
// every export is far below 2^53 bytes.
import fs from 'node:fs';
import {
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
  blkDiscard, blkGetSize64, blkZeroOut, fadviseWillNeed, fallocate, preadCached, seekData, seekHole,
} from './native.js';

// The fast path. A thread-pool hop costs more than a page-cache copy (measured here: 4k random
// writes at QD16 went from ~39k to ~105k IOPS without it). So small I/O runs in place when it
// cannot block on the device: reads take what the page cache holds (RWF_NOWAIT) and send only
// misses to the pool; writes run in place while they stay fast, and one slow write (dirty-page
// throttling, a device without cache) sends the LUN's writes to the pool for a while. Two slow
// writes in a row are needed: under CPU contention one preempted write looks slow too, while a
// real stall (writeback throttling, a journal commit, a device without cache) repeats.
const FAST_MAX = 256 * 1024;
const SLOW_WRITE_MS = 2;
const SLOW_STREAK = 2;
const SLOW_BACKOFF_MS = 500;
const RESOLVED = Promise.resolve();

export interface Extent {
  length: number;
  /** True where the range reads as zeros without being stored (a hole). */
  hole: boolean;
}

/** Thrown by zero() when the caller asked for a fast zero and none is possible. */
export class NotFastError extends Error {
  readonly code = 'ENOTSUP';
}

const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

export class Backing {
  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly size: number,
    readonly isBlockDevice: boolean,
    readonly readOnly: boolean,
  ) {}

  /** Set false to send all I/O through the thread pool (config io.fastPath). */
  fastPath = true;
  private fastReads = true;
  private fastWritesAfter = 0;
  private slowStreak = 0;

  static async open(path: string, readOnly: boolean): Promise<Backing> {
    const st = await fs.promises.stat(path);
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new Error(`${path} is neither a regular file nor a block device`);
    }
    const isBlock = st.isBlockDevice();
    // O_EXCL on a block device refuses one that is mounted or claimed (as DRBD claims its disk).
    let flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    if (isBlock && !readOnly) flags |= fs.constants.O_EXCL;
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
    try {
      const size = isBlock ? blockDeviceSize(fd, st.rdev) : st.size;
      return new Backing(path, fd, size, isBlock, readOnly);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** Fill `buf` from `pos`; a short read inside the export means the device shrank: EIO. */
  read(buf: Buffer, pos: number): Promise<void> {
    let start = 0;
    if (this.fastPath && this.fastReads && buf.length <= FAST_MAX) {
      try {
        const n = preadCached(this.fd, buf, pos);
        if (n < 0) this.fastReads = false;
        else if (n === buf.length) return RESOLVED;
        else start = n;
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.readFrom(buf, pos, start);
  }

  private readFrom(buf: Buffer, pos: number, start: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.read(this.fd, buf, done, buf.length - done, pos + done, (err, n) => {
          if (err) return reject(err);
          if (n === 0) return reject(Object.assign(new Error(`short read at ${pos + done}`), { code: 'EIO' }));
          if (done + n === buf.length) return resolve();
          step(done + n);
        });
      };
      step(start);
    });
  }

  write(buf: Buffer, pos: number): Promise<void> {
    if (this.fastPath && buf.length <= FAST_MAX && !this.readOnly) {
      const now = performance.now();
      if (now >= this.fastWritesAfter) {
        try {
          for (let done = 0; done < buf.length;) done += fs.writeSync(this.fd, buf, done, buf.length - done, pos + done);
        } catch (err) {
          return Promise.reject(err);
        }
        if (performance.now() - now <= SLOW_WRITE_MS) this.slowStreak = 0;
        else if (++this.slowStreak >= SLOW_STREAK) {
          this.slowStreak = 0;
          this.fastWritesAfter = performance.now() + SLOW_BACKOFF_MS;
        }
        return RESOLVED;
      }
    }
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.write(this.fd, buf, done, buf.length - done, pos + done, (err, n) => {
          if (err) return reject(err);
          if (done + n === buf.length) return resolve();
          step(done + n);
        });
      };
      step(0);
    });
  }

  /** Make every completed write durable (FLUSH, FUA). */
  flush(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Discard a range. TRIM is advisory: where the device cannot, the data simply stays. */
  async trim(pos: number, len: number): Promise<void> {
    try {
      if (this.isBlockDevice) await blkDiscard(this.fd, pos, len);
      else await fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
    } catch (err) {
      if (!isUnsupported(err)) throw err;
    }
  }

  /**
   * Make a range read as zeros. `mayPunch`: a hole is fine (no NO_HOLE flag).
   * `fastOnly`: fail with NotFastError instead of writing zeros (NBD FAST_ZERO).
   */
  async zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean): Promise<void> {
    try {
      if (this.isBlockDevice) {
        await blkZeroOut(this.fd, pos, len);
      } else if (mayPunch) {
        await fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
      } else {
        await fallocate(this.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, pos, len);
      }
      return;
    } catch (err) {
      if (!isUnsupported(err)) throw err;
    }
    if (fastOnly) throw new NotFastError('no fast zero on this device');
    for (let done = 0; done < len; done += ZERO_CHUNK.length) {
      const n = Math.min(ZERO_CHUNK.length, len - done);
      await this.write(n === ZERO_CHUNK.length ? ZERO_CHUNK : ZERO_CHUNK.subarray(0, n), pos + done);
    }
  }

  /** Readahead hint (NBD_CMD_CACHE). */
  cache(pos: number, len: number): Promise<void> {
    return fadviseWillNeed(this.fd, pos, len);
  }

  /**
   * Allocation map of [pos, pos+len) as at most `max` extents covering a prefix of the range.
   * Block devices cannot tell, so they report all data.
   */
  extents(pos: number, len: number, max: number): Extent[] {
    const end = pos + len;
    if (this.isBlockDevice) return [{ length: len, hole: false }];
    const out: Extent[] = [];
    let at = pos;
    while (at < end && out.length < max) {
      const data = seekData(this.fd, at);
      if (data < 0 || data >= end) {           // hole up to the end (or to end of file)
        out.push({ length: end - at, hole: true });
        break;
      }
      if (data > at) {
        out.push({ length: data - at, hole: true });
        at = data;
        if (out.length >= max) break;
      }
      const hole = seekHole(this.fd, at);
      const stop = hole < 0 ? end : Math.min(hole, end);
      out.push({ length: stop - at, hole: false });
      at = stop;
    }
    return out;
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}

function isUnsupported(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY' || code === 'EINVAL';
}

/** fs.stat reports 0 bytes for block devices: ask sysfs, then the BLKGETSIZE64 ioctl. */
function blockDeviceSize(fd: number, rdev: number): number {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((Math.floor(rdev / 2 ** 20) & 0xfff) << 8);
  try {
    const sectors = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim();
    return Number(sectors) * 512;
  } catch {
    return blkGetSize64(fd);
  }
}
