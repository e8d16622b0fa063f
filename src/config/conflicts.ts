// Checks across keys that no single key's validation can see: two listeners on one port, two
// LUNs on one backing store, a block device already in use, a peer that is this site itself.
// Each returns problems as "keys: what is wrong", for one ConfigError line.
import fs from 'node:fs';
import os from 'node:os';
import type { SiteConfig } from './schema.js';

const WILDCARDS = new Set(['0.0.0.0', '::', '*', '']);

function sameAddress(a: string, b: string): boolean {
  return a === b || WILDCARDS.has(a) || WILDCARDS.has(b);
}

/** listen, mirror.listen (TCP and UDP) and admin: no two on one port of overlapping addresses. */
export function portConflicts(cfg: SiteConfig): string[] {
  const binds: Array<{ key: string; host: string; port: number }> = [
    { key: 'listen.port', host: cfg.listen.host, port: cfg.listen.port },
    { key: 'admin.port', host: cfg.admin.host, port: cfg.admin.port },
  ];
  if (cfg.mirror) binds.push({ key: 'mirror.listen.port', host: cfg.mirror.listen.host, port: cfg.mirror.listen.port });
  const out: string[] = [];
  for (let i = 0; i < binds.length; i++) {
    for (let j = i + 1; j < binds.length; j++) {
      const [a, b] = [binds[i], binds[j]];
      if (a.port !== 0 && a.port === b.port && sameAddress(a.host, b.host)) {
        out.push(`${a.key} and ${b.key}: both bind port ${a.port} (${a.host} and ${b.host}); each listener needs its own port`);
      }
    }
  }
  return out;
}

/** Addresses that reach this machine: its interfaces, loopback, and the wildcard forms. */
function isLocal(host: string): boolean {
  if (host === 'localhost' || /^127\./.test(host) || host === '::1' || WILDCARDS.has(host)) return true;
  return Object.values(os.networkInterfaces()).some((list) => list?.some((i) => i.address === host));
}

/** mirror.peer must not be this site's own mirror listener (it would mirror into itself). */
export function peerIsSelf(cfg: SiteConfig): string[] {
  const m = cfg.mirror;
  if (!m || m.peer.port !== m.listen.port || m.listen.port === 0) return [];
  const self = m.peer.host === m.listen.host || (WILDCARDS.has(m.listen.host) && isLocal(m.peer.host));
  return self
    ? [`mirror.peer.host and mirror.peer.port: ${m.peer.host}:${m.peer.port} is this site's own mirror listener (mirror.listen); name the other site`]
    : [];
}

/** The identity of a backing store: realpath for files, the device number for block devices. */
function identity(path: string): string | null {
  try {
    const st = fs.statSync(path);
    return st.isBlockDevice() ? `dev:${st.rdev}` : `file:${fs.realpathSync(path)}`;
  } catch {
    return null;   // reported by the per-LUN path check
  }
}

export function sharedBacking(cfg: SiteConfig): string[] {
  const seen = new Map<string, number>();
  const out: string[] = [];
  cfg.luns.forEach((lun, i) => {
    const id = identity(lun.path);
    if (id === null) return;
    const first = seen.get(id);
    if (first === undefined) seen.set(id, i);
    else out.push(`luns[${first}].path and luns[${i}].path: both are ${lun.path === cfg.luns[first].path ? lun.path : `${cfg.luns[first].path} (as ${lun.path})`}; each LUN needs its own backing store`);
  });
  return out;
}

function majorMinor(rdev: number): string {
  // Linux dev_t: major in bits 8-19 (and 32+), minor in bits 0-7 and 20-31.
  const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >> 12) & ~0xff);
  return `${major}:${minor}`;
}

/**
 * A block device LUN opened read-write (as the site will, exclusively) must not be mounted or
 * held (LVM, md, dm-crypt...). `skip`: paths this process holds itself (a reload).
 */
export function busyDevices(cfg: SiteConfig, skip: ReadonlySet<string> = new Set()): string[] {
  const out: string[] = [];
  let mounts: string[] | null = null;
  cfg.luns.forEach((lun, i) => {
    if (lun.readOnly && lun.role !== 'secondary') return;   // opened shared, read-only
    if (skip.has(lun.path)) return;
    let st: fs.Stats;
    try { st = fs.statSync(lun.path); } catch { return; }
    if (!st.isBlockDevice()) return;
    mounts ??= readMounts();
    const mountedOn = mounts.filter((line) => {
      const [source] = line.split(' ');
      try { return source.startsWith('/') && fs.statSync(source).rdev === st.rdev; } catch { return false; }
    }).map((line) => line.split(' ')[1]);
    if (mountedOn.length) {
      out.push(`luns[${i}].path: ${lun.path} is mounted on ${mountedOn.join(', ')}; unmount it first`);
      return;
    }
    let holders: string[] = [];
    try { holders = fs.readdirSync(`/sys/dev/block/${majorMinor(st.rdev)}/holders`); } catch { /* no sysfs entry */ }
    if (holders.length) {
      out.push(`luns[${i}].path: ${lun.path} is held by ${holders.join(', ')} (LVM, md, dm...); release it first`);
      return;
    }
    // What neither shows (a mounted partition of this disk, another exclusive opener): O_EXCL says EBUSY.
    try {
      fs.closeSync(fs.openSync(lun.path, fs.constants.O_RDONLY | fs.constants.O_EXCL));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EBUSY') {
        out.push(`luns[${i}].path: ${lun.path} is busy (opened exclusively elsewhere: a mounted partition, another program, or a running site)`);
      }
    }
  });
  return out;
}

function readMounts(): string[] {
  try {
    return fs.readFileSync('/proc/self/mounts', 'utf8').split('\n').filter(Boolean);
  } catch {
    return [];
  }
}
