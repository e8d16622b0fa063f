// The kernel block path end to end: nbdfuse exposes lun0 as a file, a loop device turns it into a
// block device, ext4 goes on top. After everything is torn down, the backing file must fsck clean.
import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { isMounted, loopAttach, loopDetach, umountQuiet } from '../helpers/blockdev.js';
import { Cleanup, exec, execNoThrow, pollUntil, sha256File, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;

describe('kernel block path: nbdfuse → loop → ext4', function () {
  const cleanup = new Cleanup();
  const SIZE = 128 * MiB;
  let site: Site;
  let dir: Awaited<ReturnType<typeof tmpDir>>;
  let lun0: string;
  let fuseDir: string;
  let fsDir: string;
  let nbdfuse: ChildProcess | undefined;
  let nbdfuseExit: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | undefined;
  const nbdfuseStderr: string[] = [];
  let loopDev: string | undefined;
  const files = new Map<string, string>(); // relative path -> sha256

  before(async function () {
    dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    lun0 = await sparseFile(dir.join('lun0.img'), SIZE);
    fuseDir = dir.join('mnt');
    fsDir = dir.join('fs');
    await fs.mkdir(fuseDir);
    await fs.mkdir(fsDir);
    site = await startSite({ luns: [{ name: 'lun0', path: lun0, role: 'primary', mirror: 'none' }] });
    cleanup.add('stop site', () => site.stop());
  });

  after(async function () {
    // Whatever state a failure left behind: unmount, detach, unmount FUSE, stop nbdfuse, stop site.
    if (await isMounted(fsDir)) await umountQuiet(fsDir);
    if (loopDev) await loopDetach(loopDev).catch(() => undefined);
    if (nbdfuse && nbdfuse.exitCode === null && nbdfuse.signalCode === null) {
      await execNoThrow('fusermount3', ['-u', '-z', fuseDir], { timeoutMs: 15_000 });
      const exited = await Promise.race([nbdfuseExit!.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 5_000))]);
      if (!exited) {
        nbdfuse.kill('SIGKILL');
        await nbdfuseExit;
      }
    }
    await cleanup.run();
  });

  it('nbdfuse exposes lun0 as DIR/mnt/nbd', async function () {
    const pidFile = dir.join('nbdfuse.pid');
    // nbdfuse MOUNTPOINT URI creates MOUNTPOINT/nbd; it stays in the foreground.
    nbdfuse = spawn('nbdfuse', ['-P', pidFile, fuseDir, site.uri('lun0')], { stdio: ['ignore', 'ignore', 'pipe'] });
    nbdfuse.stderr!.setEncoding('utf8');
    nbdfuse.stderr!.on('data', (d: string) => nbdfuseStderr.push(d));
    nbdfuseExit = new Promise((resolve) => nbdfuse!.once('exit', (code, signal) => resolve({ code, signal })));
    // -P writes the pid file once nbdfuse is ready to serve; there is no other event to wait on.
    await pollUntil(
      async () => {
        if (nbdfuse!.exitCode !== null) throw new Error(`nbdfuse exited ${nbdfuse!.exitCode}: ${nbdfuseStderr.join('')}`);
        return (await fs.readFile(pidFile, 'utf8').catch(() => '')).trim().length > 0;
      },
      { timeoutMs: 15_000, what: 'nbdfuse pid file' },
    ).catch((err: Error) => {
      throw new Error(`${err.message}\nnbdfuse stderr: ${nbdfuseStderr.join('')}`);
    });
    const st = await fs.stat(dir.join('mnt', 'nbd'));
    expect(st.size).to.equal(SIZE);
  });

  it('a loop device over the FUSE file takes an ext4 file system', async function () {
    expect(nbdfuse, 'nbdfuse running').to.not.equal(undefined);
    loopDev = await loopAttach(dir.join('mnt', 'nbd'));
    const size = await exec('blockdev', ['--getsize64', loopDev]);
    expect(Number(size.stdout.trim())).to.equal(SIZE);
    await exec('mkfs.ext4', ['-q', '-F', loopDev], { timeoutMs: 60_000 });
  });

  it('files written on the mounted fs survive a remount (including 20 MiB of random data)', async function () {
    expect(loopDev, 'loop device attached').to.not.equal(undefined);
    await exec('mount', [loopDev!, fsDir], { timeoutMs: 30_000 });
    await fs.writeFile(`${fsDir}/hello.txt`, 'hello from the kernel path\n');
    await fs.mkdir(`${fsDir}/sub`);
    for (let i = 0; i < 50; i++) await fs.writeFile(`${fsDir}/sub/f${i}.bin`, randomBytes(1000 + i * 97));
    await fs.writeFile(`${fsDir}/big.bin`, randomBytes(20 * MiB));
    for (const rel of ['hello.txt', 'big.bin', ...Array.from({ length: 50 }, (_, i) => `sub/f${i}.bin`)]) {
      files.set(rel, await sha256File(`${fsDir}/${rel}`));
    }
    await exec('umount', [fsDir], { timeoutMs: 60_000 });

    // Re-attach the loop device: reopening the FUSE file (no kernel_cache) drops its page
    // cache, so the remount really reads back through loop → FUSE → NBD.
    await loopDetach(loopDev!);
    loopDev = undefined;
    loopDev = await loopAttach(dir.join('mnt', 'nbd'));

    await exec('mount', [loopDev!, fsDir], { timeoutMs: 30_000 });
    expect(await fs.readFile(`${fsDir}/hello.txt`, 'utf8')).to.equal('hello from the kernel path\n');
    const mismatched: string[] = [];
    for (const [rel, sum] of files) if ((await sha256File(`${fsDir}/${rel}`)) !== sum) mismatched.push(rel);
    expect(mismatched, 'files whose content changed across the remount').to.deep.equal([]);
    expect((await fs.stat(`${fsDir}/big.bin`)).size).to.equal(20 * MiB);
    await exec('umount', [fsDir], { timeoutMs: 60_000 });
  });

  it('after umount, loop detach, FUSE unmount and site stop, e2fsck -fn on the backing file is clean', async function () {
    expect(files.size, 'the files were written').to.be.greaterThan(0);
    await loopDetach(loopDev!);
    loopDev = undefined;
    await exec('fusermount3', ['-u', fuseDir], { timeoutMs: 30_000 });
    let timer: NodeJS.Timeout | undefined;
    const fuseExit = await Promise.race([
      nbdfuseExit!,
      new Promise<null>((r) => {
        timer = setTimeout(() => r(null), 10_000);
      }),
    ]);
    clearTimeout(timer);
    expect(fuseExit, `nbdfuse exit; stderr: ${nbdfuseStderr.join('')}`).to.deep.equal({ code: 0, signal: null });

    const exit = await site.stop();
    expect(exit, `site exit; stderr:\n${site.stderr.join('\n')}`).to.deep.equal({ code: 0, signal: null });

    const fsck = await execNoThrow('e2fsck', ['-fn', lun0], { timeoutMs: 60_000 });
    expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
    // The data really is in the backing file: the fs has our 20 MiB file.
    const ls = await exec('debugfs', ['-R', 'stat /big.bin', lun0], { timeoutMs: 30_000 });
    expect(ls.stdout).to.match(/Size: 20971520\b/);
  });
});
