// `config check` and `serve` on configurations that only fail across keys or against the
// machine: a mounted or busy block device (root: loop devices), a port another process holds.
// Each is one stderr line naming the keys, exit 2 (the unit does not restart on 2).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { loopAttach, loopDetach, umountQuiet } from './helpers/blockdev.js';
import { exec } from './helpers/exec.js';
import { freePorts } from './helpers/ports.js';
import { Cleanup, sparseFile } from './helpers/tmp.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');

function cli(args: string[], timeoutMs = 20_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NBD_MIRROR_')) env[k] = v;
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr });
    });
  });
}

const oneLine = (s: string) => s.split('\n').filter(Boolean);

describe('cli: config errors across keys and against the machine (exit 2, one line)', function () {
  this.timeout(60_000);
  const cleanup = new Cleanup();
  let dir: string;
  beforeEach(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cli-config-'));
    cleanup.add('dir', () => fs.rmSync(dir, { recursive: true, force: true }));
  });
  afterEach(() => cleanup.run());

  let files = 0;
  const write = (value: unknown) => {
    const file = path.join(dir, `site${files++}.json`);
    fs.writeFileSync(file, JSON.stringify(value));
    return file;
  };

  it('config check: duplicate ports, "readOnly": "no", shared backing file: one line naming the keys, exit 2', async function () {
    const image = await sparseFile(path.join(dir, 'a.img'), 1 << 20);
    const file = write({
      site: 'a', dataDir: path.join(dir, 'data'), listen: { port: 7100 }, admin: { port: 7100 },
      luns: [{ name: 'l0', path: image, readOnly: 'no' }],
    });
    const r = await cli(['config', 'check', file]);
    expect(r.code).to.equal(2);
    expect(oneLine(r.stderr)).to.have.length(1);
    expect(r.stderr).to.include('luns[0].readOnly: must be a boolean');
    const file2 = write({
      site: 'a', dataDir: path.join(dir, 'data'), listen: { port: 7100 }, admin: { port: 7100 },
      luns: [{ name: 'l0', path: image }, { name: 'l1', path: image }],
    });
    const r2 = await cli(['config', 'check', file2]);
    expect(r2.code).to.equal(2);
    expect(oneLine(r2.stderr)).to.have.length(1);
    expect(r2.stderr).to.include('listen.port and admin.port');
    expect(r2.stderr).to.include('luns[0].path and luns[1].path');
  });

  it('config check: a mounted block device, and one held exclusively, are refused (root, loop devices)', async function () {
    const image = await sparseFile(path.join(dir, 'disk.img'), 16 << 20);
    const dev = await loopAttach(image);
    cleanup.add('loop', () => loopDetach(dev));
    const file = write({ site: 'a', dataDir: path.join(dir, 'data'), luns: [{ name: 'l0', path: dev }] });
    expect((await cli(['config', 'check', file])).code, 'a free device is accepted').to.equal(0);

    await exec('mkfs.ext4', ['-q', '-F', dev], { timeoutMs: 30_000 });
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    await exec('mount', [dev, mnt], { timeoutMs: 30_000 });
    cleanup.add('mount', () => umountQuiet(mnt));
    const mounted = await cli(['config', 'check', file]);
    expect(mounted.code).to.equal(2);
    expect(oneLine(mounted.stderr)).to.have.length(1);
    expect(mounted.stderr).to.include('luns[0].path');
    expect(mounted.stderr).to.include(`is mounted on ${mnt}`);
    // Read-only LUNs are opened shared: a mounted device may be exported read-only.
    const ro = write({ site: 'a', dataDir: path.join(dir, 'data'), luns: [{ name: 'l0', path: dev, readOnly: true }] });
    expect((await cli(['config', 'check', ro])).code).to.equal(0);
    await umountQuiet(mnt);

    // Held exclusively by another process (as a running site holds it): busy.
    const holder = execFile(process.execPath, ['-e',
      `const fs=require('fs');fs.openSync(${JSON.stringify(dev)},fs.constants.O_RDWR|fs.constants.O_EXCL);console.log('held');setInterval(()=>{},1000)`]);
    cleanup.add('holder', () => { holder.kill('SIGKILL'); });
    await new Promise<void>((resolve, reject) => {
      holder.stdout!.once('data', () => resolve());
      holder.once('exit', (code) => reject(new Error(`holder exited ${code}`)));
    });
    const busy = await cli(['config', 'check', file]);
    expect(busy.code).to.equal(2);
    expect(busy.stderr).to.include('luns[0].path');
    expect(busy.stderr).to.include('is busy');
  });

  it('serve: a port already taken exits 2 with one line naming the key', async function () {
    const image = await sparseFile(path.join(dir, 'a.img'), 1 << 20);
    const [nbdPort, adminPort] = await freePorts(2);
    const squatter = net.createServer();
    await new Promise<void>((resolve) => squatter.listen(adminPort, '127.0.0.1', () => resolve()));
    cleanup.add('squatter', () => new Promise<void>((resolve) => squatter.close(() => resolve())));
    const dataDir = path.join(dir, 'data');
    fs.mkdirSync(dataDir, { mode: 0o700 });
    const file = write({ site: 'a', dataDir, listen: { port: nbdPort }, admin: { port: adminPort }, luns: [{ name: 'l0', path: image }], log: { level: 'error' } });
    const r = await cli(['serve', '--config', file]);
    expect(r.code).to.equal(2);
    expect(oneLine(r.stderr)).to.have.length(1);
    expect(r.stderr).to.include('admin.host/admin.port');
    expect(r.stderr).to.include(`127.0.0.1:${adminPort}`);
    expect(r.stderr).to.include('EADDRINUSE');
  });
});
