// `npm start` (scripts/demo.js) as the README walks it: a write on a, site a killed (b keeps
// serving, the demo keeps running), promote on b, a started again from the demo's prompt and
// demoted, the pair converges; the banner then suggests writing where lun0 is primary (issue 18.6).
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { expect } from 'chai';
import { freePorts } from './helpers/ports.js';
import { Cleanup, cliPath, exec, execNoThrow, pollUntil, tmpDir, REPO_ROOT } from './helpers/site.js';

const MiB = 1024 * 1024;

function getStatus(port: number): Promise<{ luns: { name: string; role: string; state: string }[] } | null> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/status', timeout: 2000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { body += c; });
      res.on('end', () => { try { resolve(JSON.parse(body)); } catch { resolve(null); } });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
}

describe('the demo (npm start)', function () {
  this.timeout(120_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  it('survives a dying site: kill a, promote on b, start a from the prompt, demote it, converge; the banner follows the roles', async function () {
    const dir = await tmpDir('nbd-mirror-demo-');
    cleanup.add('remove temp dir', () => dir.cleanup());
    const ports = await freePorts(6);
    const [nbdA, , adminA, nbdB, , adminB] = ports;
    const data = dir.join('demo-data');
    const demo: ChildProcess = spawn(process.execPath, [path.join(REPO_ROOT, 'scripts', 'demo.js')], {
      env: { ...process.env, DEMO_DIR: data, DEMO_PORTS: ports.join(','), DEMO_STDIN: '1' }, stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    demo.stdout!.on('data', (c: Buffer) => { out += c.toString(); });
    demo.stderr!.on('data', (c: Buffer) => { out += c.toString(); });
    const demoExit = new Promise<number | null>((r) => demo.once('exit', (code) => r(code)));
    cleanup.add('stop the demo and its sites', async () => {
      if (demo.exitCode === null) demo.kill('SIGTERM');
      await Promise.race([demoExit, new Promise((r) => setTimeout(r, 10_000))]);
      for (const n of ['a', 'b']) {
        const pid = Number(await fs.readFile(path.join(data, n, 'site.pid'), 'utf8').catch(() => ''));
        if (pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      }
      if (demo.exitCode === null) demo.kill('SIGKILL');
    });
    const lunState = async (port: number, name: string) => (await getStatus(port))?.luns.find((l) => l.name === name);
    const what = (w: string) => `${w}; demo output:\n${out.slice(-3000)}`;

    await pollUntil(async () => (await lunState(adminA, 'lun0'))?.state === 'uptodate' && (await lunState(adminB, 'lun1'))?.state === 'uptodate',
      { timeoutMs: 60_000, intervalMs: 200, what: what('both sites up, lun0 and lun1 uptodate') });
    await pollUntil(() => out.includes('nbd-mirror demo:'), { timeoutMs: 10_000, what: what('the banner') });
    expect(out, 'the banner suggests writing lun0 on a').to.include(`nbd://127.0.0.1:${nbdA}/lun0        # lun0 is primary on a`);
    await exec('qemu-io', ['-f', 'raw', '-c', `write -P 0xab 0 ${MiB}`, `nbd://127.0.0.1:${nbdA}/lun0`], { timeoutMs: 30_000 });

    // Site a dies: the demo and site b keep running.
    const pidA = Number(await fs.readFile(path.join(data, 'a', 'site.pid'), 'utf8'));
    process.kill(pidA, 'SIGKILL');
    await pollUntil(() => out.includes('site a exited'), { timeoutMs: 10_000, what: what('the demo says site a exited') });
    expect(demo.exitCode, 'the demo is still running').to.equal(null);
    expect(await getStatus(adminB), 'site b still answers').to.not.equal(null);
    const bConfig = path.join(data, 'b', 'site.json');
    await pollUntil(async () => (await lunState(adminB, 'lun0'))?.state === 'secondary-waiting', { timeoutMs: 10_000, what: what('b sees a gone') });
    const promoted = await execNoThrow(process.execPath, [cliPath(), 'promote', 'lun0', '--config', bConfig], { timeoutMs: 20_000 });
    expect(promoted.code, what(`promote on b: ${promoted.stdout}${promoted.stderr}`)).to.equal(0);
    await exec('qemu-io', ['-f', 'raw', '-c', `write -P 0xcd ${MiB} ${MiB}`, `nbd://127.0.0.1:${nbdB}/lun0`], { timeoutMs: 30_000 });

    // Start a again from the demo's prompt, demote it: the pair converges on b's data.
    const from = out.length;
    demo.stdin!.write('a\n');
    await pollUntil(() => out.slice(from).includes('nbd-mirror demo:'), { timeoutMs: 30_000, what: what('the banner after a restarted') });
    await pollUntil(async () => (await getStatus(adminA)) !== null, { timeoutMs: 20_000, what: what('site a back') });
    const demoted = await execNoThrow(process.execPath, [cliPath(), 'demote', 'lun0', '--config', path.join(data, 'a', 'site.json')], { timeoutMs: 20_000 });
    expect(demoted.code, what(`demote on a: ${demoted.stdout}${demoted.stderr}`)).to.equal(0);
    await pollUntil(async () => (await lunState(adminB, 'lun0'))?.state === 'uptodate', { timeoutMs: 60_000, intervalMs: 200, what: what('lun0 uptodate on b') });
    const [ia, ib] = await Promise.all([fs.readFile(path.join(data, 'a', 'lun0.img')), fs.readFile(path.join(data, 'b', 'lun0.img'))]);
    expect(ia.subarray(0, 2 * MiB).equals(ib.subarray(0, 2 * MiB)), 'a\'s lun0 converged on b\'s').to.equal(true);
    expect(ib.subarray(MiB, 2 * MiB).every((x) => x === 0xcd), 'b\'s write after the failover').to.equal(true);
    const banner = out.slice(from);
    expect(banner, 'after the failover the banner suggests writing lun0 on b').to.include(`nbd://127.0.0.1:${nbdB}/lun0        # lun0 is primary on b`);
    expect(banner, 'and not on a').to.not.include(`nbd://127.0.0.1:${nbdA}/lun0        # lun0 is primary`);

    // Ctrl-C (SIGTERM) stops both sites and the demo.
    demo.kill('SIGTERM');
    expect(await Promise.race([demoExit, new Promise((r) => setTimeout(() => r('timeout'), 15_000))]), what('the demo exits')).to.equal(0);
    for (const port of [adminA, adminB]) expect(await getStatus(port), `nothing answers on ${port} after the demo stopped`).to.equal(null);
  });
});
