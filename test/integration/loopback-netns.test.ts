// scripts/loopback-test.sh end to end: two sites in their own network namespaces joined by a veth
// pair, LUNs on loop devices, bidirectional mirroring (lun0 sync a→b, lun1 async b→a), writes by
// libnbd through both sites, an iptables link cut with writes going on, SIGKILL + restart of each
// site, then a sha256 comparison of primaries, secondaries and what the clients wrote.
// Needs root (namespaces, loop devices, iptables). The script cleans up after itself; this test
// checks that it did.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { execNoThrow, REPO_ROOT } from '../helpers/site.js';
import { skipForEnvironment } from '../helpers/env-skip.js';

const SCRIPT = path.join(REPO_ROOT, 'scripts', 'loopback-test.sh');
const SCRIPT_TIMEOUT_MS = 180_000;

interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
  pid: number;
  timedOut: boolean;
  ms: number;
}

/** Run the script, stdout and stderr interleaved; SIGTERM (its trap cleans up) on timeout, SIGKILL 20 s later. */
function runScript(timeoutMs: number): Promise<RunResult> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [SCRIPT], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => chunks.push(d));
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGTERM');
      killTimer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      clearTimeout(killTimer);
      resolve({ code, signal, output: Buffer.concat(chunks).toString('utf8'), pid: child.pid!, timedOut, ms: Date.now() - started });
    });
  });
}

/** The script's own lines, then the last site log lines it dumped on failure (JSON lines). */
function summary(output: string): string {
  const lines = output.split('\n');
  const own = lines.filter((l) => !l.startsWith('{'));
  const logs = lines.filter((l) => l.startsWith('{'));
  return [...own.slice(-120), ...logs.slice(-40)].join('\n');
}

describe('loopback-test.sh: two sites in network namespaces over veth', function () {
  this.timeout(SCRIPT_TIMEOUT_MS + 30_000);
  let run: RunResult;

  before(async function () {
    if (process.getuid?.() !== 0) skipForEnvironment(this, 'network namespaces, loop devices and iptables need root');
    if (!existsSync(path.join(REPO_ROOT, 'dist', 'cli.js'))) throw new Error('dist/cli.js missing: npm run build first');
    run = await runScript(SCRIPT_TIMEOUT_MS);
  });

  it('finishes within 3 minutes and exits 0, every check passed', function () {
    expect(run.timedOut, `timed out after ${run.ms} ms\n${summary(run.output)}`).to.equal(false);
    expect(run.code, `exit ${run.code} (signal ${run.signal}) after ${run.ms} ms\n${summary(run.output)}`).to.equal(0);
    expect(run.output).to.include('ALL CHECKS PASSED');
    expect(run.output).to.not.match(/^FAIL /m);
    expect(run.output).to.match(/^total \d+(\.\d+)? s$/m);
  });

  it('prints the sha256 PASS lines for both LUNs (primary == secondary == what the clients wrote)', function () {
    const out = summary(run.output);
    expect(run.output, out).to.match(/^PASS lun0 a==b sha256 [0-9a-f]{64} /m);
    expect(run.output, out).to.match(/^PASS lun1 b==a sha256 [0-9a-f]{64} /m);
    expect(run.output, out).to.match(/^PASS lun0 client-data==a sha256 [0-9a-f]{64} /m);
    expect(run.output, out).to.match(/^PASS lun1 client-data==b sha256 [0-9a-f]{64} /m);
  });

  it('went through the outage: both primaries journaled during the cut and converged after the heal', function () {
    const out = summary(run.output);
    expect(run.output, out).to.match(/^ok {3}lun0@a is journaling after \d+ ms/m);
    expect(run.output, out).to.match(/^ok {3}lun1@b is journaling after \d+ ms/m);
    expect(run.output, out).to.match(/^ok {3}after heal: converged/m);
    expect(run.output, out).to.match(/^ok {3}after b restart: converged/m);
    expect(run.output, out).to.match(/^ok {3}after a restart: converged/m);
  });

  it('leaves no namespace, veth, loop device, process or temp dir behind', async function () {
    const work = /^ok {3}work dir (\S+) \(script pid (\d+)\)$/m.exec(run.output);
    expect(work, `the script did not print its work dir\n${summary(run.output)}`).to.not.equal(null);
    const [, dir, pid] = work!;
    expect(Number(pid)).to.equal(run.pid);

    const ns = await execNoThrow('ip', ['netns', 'list'], { timeoutMs: 10_000 });
    expect(ns.stdout).to.not.include(`nbdm-a-${pid}`);
    expect(ns.stdout).to.not.include(`nbdm-b-${pid}`);

    const links = await execNoThrow('ip', ['-o', 'link', 'show'], { timeoutMs: 10_000 });
    expect(links.stdout).to.not.include(`nbdma${pid}`);
    expect(links.stdout).to.not.include(`nbdmb${pid}`);

    const loops = await execNoThrow('losetup', ['-a'], { timeoutMs: 10_000 });
    expect(loops.stdout.split('\n').filter((l) => l.includes(dir!)), 'loop devices over the script\'s files').to.deep.equal([]);

    const ps = await execNoThrow('ps', ['-eo', 'pid,args'], { timeoutMs: 10_000 });
    expect(ps.stdout.split('\n').filter((l) => l.includes(dir!)), 'processes using the script\'s files').to.deep.equal([]);

    expect(existsSync(dir!), `${dir} still exists`).to.equal(false);
  });
});
