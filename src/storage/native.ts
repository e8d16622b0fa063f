// libc calls Node's fs does not offer, through koffi (a maintained FFI with prebuilt binaries,
// so no compiler at install time). Slow calls (fallocate, ioctl) run on koffi's worker threads.
import koffi from 'koffi';

const libc = koffi.load('libc.so.6');

const fallocateFn = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const lseekFn = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
const fadviseFn = libc.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');
const ioctlRangeFn = libc.func('int ioctl(int fd, unsigned long request, _Inout_ uint64_t *range)');
const iovec = koffi.struct('nbdm_iovec', { base: 'void *', len: 'size_t' });
const preadv2Fn = libc.func('int64_t preadv2(int fd, const nbdm_iovec *iov, int iovcnt, int64_t offset, int flags)');
const RWF_NOWAIT = 0x08;
const EAGAIN = 11;
const ENXIO = 6;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const POSIX_FADV_WILLNEED = 3;
const BLKDISCARD = 0x1277;      // _IO(0x12, 119)
const BLKZEROOUT = 0x127f;      // _IO(0x12, 127)
const BLKGETSIZE64 = 0x80081272; // _IOR(0x12, 114, size_t)

/** Error carrying the errno name, shaped like Node's fs errors so one error map serves both. */
function sysError(call: string): NodeJS.ErrnoException {
  const errno = koffi.errno();
  const err: NodeJS.ErrnoException = new Error(`${call} failed (errno ${errno})`);
  err.errno = errno;
  err.code = ERRNO_NAMES[errno] ?? 'EIO';
  return err;
}

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM', 5: 'EIO', 6: 'ENXIO', 9: 'EBADF', 12: 'ENOMEM', 13: 'EACCES', 22: 'EINVAL', 25: 'ENOTTY',
  27: 'EFBIG', 28: 'ENOSPC', 30: 'EROFS', 38: 'ENOSYS', 95: 'EOPNOTSUPP',
};

type NativeFn = ReturnType<typeof libc.func>;

function asyncCall(fn: NativeFn, name: string, ...args: unknown[]): Promise<void> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: Error | null, rc: number) => {
      if (err) reject(err);
      else if (rc < 0) reject(sysError(name));
      else resolve();
    });
  });
}

export function fallocate(fd: number, mode: number, offset: number, len: number): Promise<void> {
  return asyncCall(fallocateFn, 'fallocate', fd, mode, offset, len);
}

function blkRange(fd: number, request: number, name: string, offset: number, len: number): Promise<void> {
  return asyncCall(ioctlRangeFn, name, fd, request, [BigInt(offset), BigInt(len)]);
}

export const blkDiscard = (fd: number, offset: number, len: number) => blkRange(fd, BLKDISCARD, 'BLKDISCARD', offset, len);
export const blkZeroOut = (fd: number, offset: number, len: number) => blkRange(fd, BLKZEROOUT, 'BLKZEROOUT', offset, len);

export function blkGetSize64(fd: number): number {
  const out = [0n];
  if (ioctlRangeFn(fd, BLKGETSIZE64, out) < 0) throw sysError('BLKGETSIZE64');
  return Number(out[0]);
}

/**
 * Next data (SEEK_DATA) or hole (SEEK_HOLE) at or after `offset`; -1 when there is none
 * (ENXIO: only holes up to end of file). Synchronous: a metadata lookup, cheap. Any other
 * failure throws: a range must never read as a hole because a lookup failed.
 */
export function seekData(fd: number, offset: number): number {
  return seek(fd, offset, SEEK_DATA);
}
export function seekHole(fd: number, offset: number): number {
  return seek(fd, offset, SEEK_HOLE);
}

function seek(fd: number, offset: number, whence: number): number {
  const at = Number(lseekFn(fd, offset, whence));
  if (at >= 0) return at;
  if (koffi.errno() === ENXIO) return -1;
  throw sysError('lseek');
}

/**
 * Read what the page cache already holds, without ever blocking on the device
 * (preadv2 RWF_NOWAIT): the bytes read (possibly fewer than asked), or 0 if none were cached.
 */
export function preadCached(fd: number, buf: Buffer, offset: number): number {
  const n = Number(preadv2Fn(fd, [{ base: buf, len: buf.length }], 1, offset, RWF_NOWAIT));
  if (n >= 0) return n;
  const errno = koffi.errno();
  if (errno === EAGAIN) return 0;
  if (errno === 95 || errno === 22) return -1;   // RWF_NOWAIT not supported here: never try again
  throw sysError('preadv2');
}

/** Readahead hint for NBD_CMD_CACHE; posix_fadvise returns the error number itself. */
export function fadviseWillNeed(fd: number, offset: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fadviseFn.async(fd, offset, len, POSIX_FADV_WILLNEED, (err: Error | null, rc: number) => {
      if (err) reject(err);
      else if (rc !== 0) reject(Object.assign(new Error(`posix_fadvise failed (errno ${rc})`), { code: ERRNO_NAMES[rc] ?? 'EIO' }));
      else resolve();
    });
  });
}
