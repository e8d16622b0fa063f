// Positional file I/O for the durable files of persist/ (journal, undo log, bitmap, metadata):
// fd-based, with Number positions checked first — Node 20 silently ignores bigint positions
// (and a position past 2^53 cannot be a Number), so a bad offset must fail, not write elsewhere.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

export const FILE_MODE = 0o600;

/** Rejects (RangeError) a position that is not a safe non-negative integer, or whose end is not. */
export function checkPosition(pos: number, len: number): RangeError | null {
  if (Number.isSafeInteger(pos) && pos >= 0 && Number.isSafeInteger(pos + len)) return null;
  return new RangeError(`file position ${pos} (+${len}) is not a safe non-negative integer`);
}

export function openFile(file: string, flags: number, mode = FILE_MODE): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

export function fsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
}

export function ftruncate(fd: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, len, (err) => (err ? reject(err) : resolve())));
}

export function fstatSize(fd: number): Promise<number> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st.size))));
}

/** Read up to `len` bytes at `pos` into `buf` at `at`; returns the bytes read (short only at EOF). */
export function preadFull(fd: number, buf: Buffer, at: number, len: number, pos: number): Promise<number> {
  const bad = checkPosition(pos, len);
  if (bad) return Promise.reject(bad);
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === len) return resolve(done);
      fs.read(fd, buf, at + done, len - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return resolve(done);
        step(done + n);
      });
    };
    step(0);
  });
}

/** Write all of `buf` at `pos`. */
export function pwriteFull(fd: number, buf: Buffer, pos: number): Promise<void> {
  const bad = checkPosition(pos, buf.length);
  if (bad) return Promise.reject(bad);
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === buf.length) return resolve();
      fs.write(fd, buf, done, buf.length - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return reject(Object.assign(new Error(`short write at ${pos + done}`), { code: 'EIO' }));
        step(done + n);
      });
    };
    step(0);
  });
}

/** Write every buffer of `bufs`, back to back, at `pos` (one writev; continues after a short write). */
export function pwritevFull(fd: number, bufs: Buffer[], pos: number): Promise<void> {
  let total = 0;
  for (const b of bufs) total += b.length;
  const bad = checkPosition(pos, total);
  if (bad) return Promise.reject(bad);
  return new Promise((resolve, reject) => {
    const step = (list: Buffer[], at: number, left: number): void => {
      fs.writev(fd, list, at, (err, n) => {
        if (err) return reject(err);
        if (n === left) return resolve();
        if (n === 0) return reject(Object.assign(new Error(`short write at ${at}`), { code: 'EIO' }));
        // Drop the bytes written and go on with the rest.
        let skip = n;
        let i = 0;
        while (skip >= list[i].length) skip -= list[i++].length;
        const rest = list.slice(i);
        rest[0] = rest[0].subarray(skip);
        step(rest, at + n, left - n);
      });
    };
    if (total === 0) resolve();
    else step(bufs, pos, total);
  });
}

/** True if every byte of the file from `pos` to `end` is zero (reads through `buf`, or a fresh 4 MiB buffer). */
export async function zerosFrom(fd: number, pos: number, end: number, buf = Buffer.allocUnsafe(4 * 1024 * 1024)): Promise<boolean> {
  for (let at = pos; at < end;) {
    const n = Math.min(buf.length, end - at);
    if (await preadFull(fd, buf, 0, n, at) < n) return false;
    for (let i = 0; i < n; i++) if (buf[i] !== 0) return false;
    at += n;
  }
  return true;
}

/**
 * Create `file` holding exactly `content`, atomically: write a temporary file next to it,
 * fdatasync, rename over, fsync the directory. Either the old state (no file) or the complete
 * file survives a crash. Fails with EEXIST if `file` exists.
 */
export async function createFileAtomic(file: string, content: Buffer): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const fd = await openFile(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC);
  try {
    await pwriteFull(fd, content, 0);
    await fdatasync(fd);
  } catch (err) {
    await closeFd(fd).catch(() => undefined);
    await fs.promises.rm(tmp, { force: true });
    throw err;
  }
  await closeFd(fd);
  try {
    // link() fails if `file` appeared meanwhile instead of replacing it (rename would).
    await fs.promises.link(tmp, file);
  } finally {
    await fs.promises.rm(tmp, { force: true });
  }
  await fsyncDir(path.dirname(file));
}

/**
 * Replace `file` with `content` atomically: write `tmp`, fsync, rename over `file`, fsync the
 * directory. The caller runs one replacement at a time per `tmp` (a second would truncate it).
 */
export async function replaceFileAtomic(file: string, tmp: string, content: Buffer): Promise<void> {
  const fd = await openFile(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC);
  try {
    await pwriteFull(fd, content, 0);
    await fsync(fd);
  } finally {
    await closeFd(fd);
  }
  await fs.promises.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFile(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fsync(fd);
  } finally {
    await closeFd(fd);
  }
}

/**
 * Open `file` read-write, creating it atomically with `initial` (header and empty body) if it
 * does not exist. `size` is its size; `fresh` is true if it held 0 bytes — only a file created
 * empty by someone else looks like that (we create atomically) — and was initialised with
 * `initial` (fdatasync'ed): then it holds nothing to check.
 */
export async function openOrCreate(file: string, initial: Buffer): Promise<{ fd: number; size: number; fresh: boolean }> {
  let fd: number;
  for (;;) {
    try {
      fd = await openFile(file, fs.constants.O_RDWR);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    try {
      await createFileAtomic(file, initial);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
  try {
    const size = await fstatSize(fd);
    if (size !== 0) return { fd, size, fresh: false };
    await pwriteFull(fd, initial, 0);
    await fdatasync(fd);
    return { fd, size: initial.length, fresh: true };
  } catch (err) {
    await closeFd(fd).catch(() => undefined);
    throw err;
  }
}
