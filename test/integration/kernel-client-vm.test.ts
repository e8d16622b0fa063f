// The real Linux kernel NBD client (nbd.ko) against nbd-mirror. This host's kernel has no nbd
// module, so scripts/kernel-client-vm.sh boots Debian's cloud kernel under QEMU (TCG) and, in the
// guest: nbd-client (1 connection), mke2fs -t ext4, mount, a 20 MiB random file and a file with
// a known string, umount, disconnect; then nbd-client -C 2 (two connections), mount, verify,
// write another file, umount, disconnect. Afterwards, with the sites stopped, the backing files
// (the primary's, and the secondary's when mirrored) must fsck clean and hold those files.
//
// The script's cache of Debian packages (~30 MB; $NBD_MIRROR_VM_CACHE or ~/.cache/nbd-mirror-vm)
// survives the test on purpose: later runs skip the downloads.
import { expect } from 'chai';
import { skipForEnvironment } from '../helpers/env-skip.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { lunStatus, startPair, waitDrained, waitLunStates, type Pair } from '../helpers/pair.js';
import { Cleanup, REPO_ROOT, exec, execNoThrow, sha256File, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const BIG_MIB = 20;
const SCRIPT = path.join(REPO_ROOT, 'scripts', 'kernel-client-vm.sh');
/** Generous: other test runs may share the 2 cores with this TCG guest. */
const PREPARE_TIMEOUT_MS = 200_000;
const VM_TIMEOUT_S = 150;

interface ScriptResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

// Script runs still going. A SIGTERM (or Ctrl-C's SIGINT) makes the script stop its VM; the VM
// is also bounded by the script's own `timeout`, should this process die without a word.
const running = new Set<ChildProcess>();
let exitHook = false;

function signal(child: ChildProcess, sig: NodeJS.Signals): void {
  try {
    child.kill(sig);
  } catch {
    /* already gone */
  }
}

function runScript(args: string[], timeoutMs: number): Promise<ScriptResult> {
  if (!exitHook) {
    exitHook = true;
    process.on('exit', () => {
      for (const c of running) signal(c, 'SIGTERM');
    });
  }
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [SCRIPT, ...args], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    let killTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      signal(child, 'SIGTERM');
      killTimer = setTimeout(() => signal(child, 'SIGKILL'), 20_000);
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      running.delete(child);
      reject(new Error(`cannot run ${SCRIPT}: ${err.message}`));
    });
    child.once('close', (code, sig) => {
      clearTimeout(timer);
      clearTimeout(killTimer);
      running.delete(child);
      resolve({ code, signal: sig, stdout, stderr, timedOut });
    });
  });
}

/** Stop script runs a failed or timed-out test left behind (and with them their VMs). */
async function stopScripts(): Promise<void> {
  await Promise.all(
    [...running].map(
      (c) =>
        new Promise<void>((resolve) => {
          const t = setTimeout(() => {
            signal(c, 'SIGKILL');
            resolve();
          }, 20_000);
          c.once('close', () => {
            clearTimeout(t);
            resolve();
          });
          signal(c, 'SIGTERM');
        }),
    ),
  );
}

function describeRun(r: ScriptResult): string {
  const tail = (s: string) => (s.length > 6000 ? `...${s.slice(-6000)}` : s);
  return `kernel-client-vm.sh ${r.timedOut ? 'timed out' : r.signal ? `signal ${r.signal}` : `exit ${r.code}`}` +
    `\n--- stdout ---\n${tail(r.stdout)}\n--- stderr ---\n${tail(r.stderr)}`;
}

async function haveCommand(cmd: string): Promise<boolean> {
  return (await execNoThrow('sh', ['-c', `command -v ${cmd}`])).code === 0;
}

interface GuestRun {
  /** The known string written to /hello.txt. */
  string: string;
  /** sha256 of /big.bin as the guest wrote it. */
  bigSum: string;
  result: ScriptResult;
}

/** Boot the VM against 127.0.0.1:port, export lun0; throws with the console output on failure. */
async function runGuest(port: number): Promise<GuestRun> {
  const tag = randomBytes(6).toString('hex');
  const result = await runScript(
    ['--port', String(port), '--export', 'lun0', '--connections', '2', '--expect-size', String(SIZE),
      '--tag', tag, '--big-mib', String(BIG_MIB), '--timeout', String(VM_TIMEOUT_S)],
    (VM_TIMEOUT_S + 60) * 1000,
  );
  expect(result.code, describeRun(result)).to.equal(0);
  expect(result.stdout).to.match(/kernel-client-vm: PASS \(\d+ steps\)/);
  for (const step of ['connect-1', 'size', 'mkfs', 'write', 'umount-1', 'disconnect-1', 'connect-2', 'verify', 'write-2', 'umount-2', 'disconnect-2']) {
    expect(result.stdout, `guest step ${step}`).to.match(new RegExp(`^kernel-client-vm: ok ${step}:`, 'm'));
  }
  expect(result.stdout).to.match(/^kernel-client-vm: ok connect-2: .*: 2 connections/m);
  const bigSum = /big\.bin sha256: ([0-9a-f]{64})/.exec(result.stdout)?.[1];
  expect(bigSum, 'big.bin sha256 in the script output').to.be.a('string');
  const string = `nbd-mirror-kernel-test-${tag}`;
  expect(result.stdout).to.include(`string: ${string}`);
  const time = /kernel-client-vm: time: (.*)/.exec(result.stdout)?.[1];
  if (time) console.log(`      [kernel-client-vm] ${time}`);
  return { string, bigSum: bigSum!, result };
}

/** With no site running: the image fscks clean and holds what the guest wrote. */
async function checkImage(img: string, run: GuestRun, dir: TmpDir, label: string): Promise<void> {
  const fsck = await execNoThrow('e2fsck', ['-fn', img], { timeoutMs: 60_000 });
  expect(fsck.code, `${label}: e2fsck -fn ${img}\n${fsck.stdout}${fsck.stderr}`).to.equal(0);

  const hello = await exec('debugfs', ['-R', 'cat /hello.txt', img], { timeoutMs: 30_000 });
  expect(hello.stdout, `${label}: /hello.txt`).to.equal(`${run.string}\n`);
  const second = await exec('debugfs', ['-R', 'cat /second.txt', img], { timeoutMs: 30_000 });
  expect(second.stdout, `${label}: /second.txt (written over 2 connections)`).to.equal(`${run.string}-connections-2\n`);

  const out = dir.join(`${label}-big.bin`);
  await exec('debugfs', ['-R', `dump /big.bin ${out}`, img], { timeoutMs: 60_000 });
  expect(await sha256File(out), `${label}: /big.bin sha256`).to.equal(run.bigSum);

  // And the raw bytes, without going through the file system (-z: NUL-separated "lines").
  const grep = await exec('grep', ['-c', '-a', '-z', '-F', run.string, img], { timeoutMs: 60_000 });
  expect(Number(grep.stdout.trim()), `${label}: occurrences of the string in ${img}`).to.be.at.least(1);
}

describe('kernel NBD client (nbd.ko in a QEMU/TCG guest): mkfs, mount, files, -C 2', function () {
  this.timeout(240_000);

  before(async function () {
    if (process.platform !== 'linux' || process.arch !== 'x64') skipForEnvironment(this, `the guest is x86-64 Linux under TCG; this is ${process.platform}/${process.arch}`);
    const root = process.getuid?.() === 0;
    if (!(await haveCommand('qemu-system-x86_64')) && !(root && (await haveCommand('apt-get')))) {
      skipForEnvironment(this, 'no qemu-system-x86_64, and no root with apt-get to install it');
    }
    // Install QEMU if needed, download the guest packages, build the initramfs (cached).
    const prep = await runScript(['--prepare'], PREPARE_TIMEOUT_MS);
    expect(prep.code, describeRun(prep)).to.equal(0);
  });

  after(stopScripts);

  describe('single site (lun0 primary, no mirror)', function () {
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let img: string;
    let site: Site;

    before(async function () {
      dir = await tmpDir('nbd-mirror-kvm-');
      cleanup.add('remove temp dir', () => dir.cleanup());
      img = await sparseFile(dir.join('a-lun0.img'), SIZE);
      site = await startSite({ luns: [{ name: 'lun0', path: img, role: 'primary', mirror: 'none' }] });
      cleanup.add('stop site', () => site.stop());
    });

    after(async function () {
      await stopScripts();
      await cleanup.run();
    });

    it('the guest passes every step and the backing file fscks clean with its files', async function () {
      const run = await runGuest(site.port);
      const exit = await site.stop();
      expect(exit, `site exit; stderr:\n${site.stderr.join('\n')}`).to.deep.equal({ code: 0, signal: null });
      await checkImage(img, run, dir, 'a');
    });
  });

  describe('mirrored pair (a:lun0 primary, sync to b:lun0 secondary)', function () {
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let imgA: string;
    let imgB: string;
    let pair: Pair;

    before(async function () {
      dir = await tmpDir('nbd-mirror-kvm-');
      cleanup.add('remove temp dir', () => dir.cleanup());
      imgA = await sparseFile(dir.join('a-lun0.img'), SIZE);
      imgB = await sparseFile(dir.join('b-lun0.img'), SIZE);
      pair = await startPair({
        a: { luns: [{ name: 'lun0', path: imgA, role: 'primary', mirror: 'sync' }] },
        b: { luns: [{ name: 'lun0', path: imgB, role: 'secondary', mirror: 'none' }] },
        connections: 2,
      });
      cleanup.add('stop pair', () => pair.stop());
      await waitLunStates(pair.a, { lun0: 'uptodate' });
      await waitLunStates(pair.b, { lun0: 'secondary-uptodate' });
    });

    after(async function () {
      await stopScripts();
      await cleanup.run();
    });

    it('the guest passes every step; both copies fsck clean, hold its files and are identical', async function () {
      const run = await runGuest(pair.a.port);

      const a = await waitDrained(pair.a, 'lun0');
      expect(a.state, 'a:lun0 state after the run').to.equal('uptodate');
      expect(a.mirrored?.failures ?? 0, 'a:lun0 mirror failures').to.equal(0);
      expect(a.counters.errors, 'a:lun0 host errors').to.equal(0);
      const b = await lunStatus(pair.b, 'lun0');
      expect(b.state, 'b:lun0 state after the run').to.equal('secondary-uptodate');
      expect(b.applied?.errors ?? 0, 'b:lun0 apply errors').to.equal(0);

      await pair.stop();
      for (const s of [pair.a, pair.b]) {
        expect(s.exitInfo(), `site ${s.config.site} exit; stderr:\n${s.stderr.join('\n')}`).to.deep.equal({ code: 0, signal: null });
      }
      await checkImage(imgA, run, dir, 'a');
      await checkImage(imgB, run, dir, 'b');
      // Synchronous mirroring: with everything acknowledged, the copies are byte for byte equal.
      expect(await sha256File(imgB), 'sha256 of b:lun0 vs a:lun0').to.equal(await sha256File(imgA));
    });
  });
});
