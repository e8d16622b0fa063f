// The one map from system errors (Node's err.code) to the NBD error values a client may see.
import { NBD_EIO, NBD_EINVAL, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN } from './constants.js';

const BY_CODE: Record<string, number> = {
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** NBD error for a failed system call; anything unexpected is EIO, never "success". */
export function nbdErrno(err: unknown): number {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return code && Object.hasOwn(BY_CODE, code) ? BY_CODE[code] : NBD_EIO;
}

const NAMES: Record<number, string> = {
  [NBD_EPERM]: 'EPERM', [NBD_EIO]: 'EIO', [NBD_ENOMEM]: 'ENOMEM', [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC', [NBD_EOVERFLOW]: 'EOVERFLOW', [NBD_ENOTSUP]: 'ENOTSUP', [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

export function nbdErrnoName(errno: number): string {
  return NAMES[errno] ?? `errno ${errno}`;
}
