// Loop devices and mounts for tests that go through the kernel block layer (needs root).
import { exec, execNoThrow } from './exec.js';

/** Attach `file` to a free loop device; returns e.g. /dev/loop3. */
export async function loopAttach(file: string, opts: { directIo?: boolean } = {}): Promise<string> {
  const args = ['-f', '--show'];
  if (opts.directIo) args.push('--direct-io=on');
  const r = await exec('losetup', [...args, file], { timeoutMs: 30_000 });
  const dev = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw new Error(`losetup printed ${JSON.stringify(r.stdout)}`);
  return dev;
}

/** Detach a loop device; tolerates one that is already gone. Retries briefly while it is busy. */
export async function loopDetach(dev: string): Promise<void> {
  let last = '';
  for (let i = 0; i < 20; i++) {
    const r = await execNoThrow('losetup', ['-d', dev], { timeoutMs: 30_000 });
    if (r.code === 0) return;
    last = r.stderr;
    // Already detached (or never attached): nothing left to do.
    const still = await execNoThrow('losetup', [dev], { timeoutMs: 10_000 });
    if (still.code !== 0) return;
    await new Promise((res) => setTimeout(res, 100));
  }
  throw new Error(`losetup -d ${dev} failed: ${last}`);
}

/** True when `target` is currently a mount point. */
export async function isMounted(target: string): Promise<boolean> {
  const r = await execNoThrow('findmnt', ['-n', '--mountpoint', target], { timeoutMs: 10_000 });
  return r.code === 0 && r.stdout.trim().length > 0;
}

/** Unmount if mounted; falls back to a lazy unmount so cleanup never hangs the suite. */
export async function umountQuiet(target: string): Promise<void> {
  if (!(await isMounted(target))) return;
  const r = await execNoThrow('umount', [target], { timeoutMs: 30_000 });
  if (r.code !== 0 && (await isMounted(target))) await execNoThrow('umount', ['-l', target], { timeoutMs: 30_000 });
}
