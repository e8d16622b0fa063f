// The one map from system errors (Node's err.code) to the error values a peer may see. Both
// wires (NBD to hosts, the mirror link) carry these values, which are Linux errno numbers.
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

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
