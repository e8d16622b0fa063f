// The systemd units (systemd-analyze verify, offline, on instances of the templates) and
// scripts/install.sh (with DESTDIR: everything under a temp root, no systemctl).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');

interface Run { code: number | null; stdout: string; stderr: string }

function run(file: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    execFile(file, args, {
      env: opts.env ?? process.env, cwd: opts.cwd, timeout: opts.timeoutMs ?? 60_000, killSignal: 'SIGKILL',
      encoding: 'utf8', maxBuffer: 16 * 1024 * 1024,
    }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string }) | null;
      if (e && typeof e.code === 'string') return reject(new Error(`cannot run ${file}: ${e.message}`));
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr });
    });
  });
}

/** The [Section] Key=value assignments of a unit file (continuation lines are not used here). */
function assignments(text: string): { section: string; key: string; value: string }[] {
  const out: { section: string; key: string; value: string }[] = [];
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const s = /^\[(.+)\]$/.exec(line);
    if (s) { section = s[1]; continue; }
    const eq = line.indexOf('=');
    if (eq > 0) out.push({ section, key: line.slice(0, eq), value: line.slice(eq + 1) });
  }
  return out;
}

function values(text: string, section: string, key: string): string[] {
  return assignments(text).filter((a) => a.section === section && a.key === key).map((a) => a.value);
}

describe('systemd units', function () {
  let dir: string;

  before(async function () {
    expect(fs.existsSync(CLI), `${CLI} (run npm run build)`).to.equal(true);
    const which = await run('/bin/sh', ['-c', 'command -v systemd-analyze']);
    expect(which.code, 'systemd-analyze is needed (Debian package "systemd")').to.equal(0);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-units-'));
  });
  after(function () {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** systemd-analyze verify on `file`; asserts a clean result, printing everything on failure. */
  async function verify(file: string): Promise<void> {
    const r = await run('systemd-analyze', ['verify', '--man=no', '--generators=no', file]);
    const name = path.basename(file);
    const template = name.replace(/@[^.]+\./, '@.');
    const mentions = `${r.stdout}\n${r.stderr}`.split('\n').filter((l) => l.includes(name) || l.includes(template) || l.includes(file));
    const report = `systemd-analyze verify ${file}: exit ${r.code}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
    expect(r.code, report).to.equal(0);
    expect(mentions, report).to.deep.equal([]);
  }

  it('nbd-mirror@.service verifies as an instance, with the launcher pointing at a real binary', async function () {
    const text = fs.readFileSync(path.join(ROOT, 'systemd', 'nbd-mirror@.service'), 'utf8');
    expect(values(text, 'Service', 'ExecStart')).to.deep.equal(['/usr/bin/nbd-mirror serve --config /etc/nbd-mirror/%i.json']);
    const launcher = path.join(dir, 'nbd-mirror');
    fs.writeFileSync(launcher, `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} ${JSON.stringify(CLI)} "$@"\n`, { mode: 0o755 });
    const help = await run(launcher, ['--help']);
    expect(help.code, help.stderr).to.equal(0);
    const unit = path.join(dir, 'nbd-mirror@site-a.service');
    fs.writeFileSync(unit, text.replaceAll('/usr/bin/nbd-mirror', launcher));
    await verify(unit);
  });

  it('nbd-mirror@.service has the settings the README promises', function () {
    const text = fs.readFileSync(path.join(ROOT, 'systemd', 'nbd-mirror@.service'), 'utf8');
    const one = (key: string) => values(text, 'Service', key);
    expect(one('Type')).to.deep.equal(['notify']);
    expect(one('NotifyAccess')).to.deep.equal(['main']);
    expect(one('WatchdogSec')).to.deep.equal(['10s']);
    expect(one('Restart')).to.deep.equal(['on-failure']);
    expect(one('RestartSec')).to.deep.equal(['2s']);
    // A configuration error (exit 2: bad file, port taken) must not restart-loop.
    expect(one('RestartPreventExitStatus')).to.deep.equal(['2']);
    expect(one('TimeoutStopSec')).to.deep.equal(['30s']);
    expect(one('ExecReload')).to.deep.equal(['/bin/kill -HUP $MAINPID']);
    expect(one('Environment')).to.include('UV_THREADPOOL_SIZE=32');
    expect(one('StateDirectory')).to.deep.equal(['nbd-mirror']);
    expect(one('ProtectSystem')).to.deep.equal(['strict']);
    expect(one('ProtectHome')).to.deep.equal(['yes']);
    expect(one('PrivateTmp')).to.deep.equal(['yes']);
    expect(one('NoNewPrivileges')).to.deep.equal(['yes']);
    expect(one('ProtectKernelTunables')).to.deep.equal(['yes']);
    expect(one('ProtectControlGroups')).to.deep.equal(['yes']);
    expect(one('RestrictAddressFamilies')).to.deep.equal(['AF_INET AF_INET6 AF_UNIX']);
    expect(one('LockPersonality')).to.deep.equal(['yes']);
    expect(one('MemoryDenyWriteExecute')).to.deep.equal(['no']);
    expect(one('DevicePolicy')).to.deep.equal(['closed']);
    expect(one('DeviceAllow')).to.include.members(['block-loop rw', 'block-sd rw', 'block-blkext rw', 'block-device-mapper rw', 'block-virtblk rw']);
    expect(one('ReadWritePaths')).to.deep.equal(['-/srv/nbd-mirror']);
    // The dataDir default must be the StateDirectory= the unit creates.
    expect(text).to.include('/var/lib/nbd-mirror');
  });

  it('nbd-client@.service verifies as an instance (nbd0)', async function () {
    const text = fs.readFileSync(path.join(ROOT, 'systemd', 'nbd-client@.service'), 'utf8');
    expect(values(text, 'Service', 'EnvironmentFile')).to.deep.equal(['/etc/nbd-mirror/client-%i.env']);
    expect(values(text, 'Service', 'ExecStop')).to.deep.equal(['/usr/sbin/nbd-client -d /dev/%i']);
    const [start] = values(text, 'Service', 'ExecStart');
    expect(start).to.match(/^\/usr\/sbin\/nbd-client \$\{HOST\} \$\{PORT\} \/dev\/%i -N \$\{EXPORT\} /);
    for (const opt of ['-C 2', '-persist', '-timeout 30', '-nofork', '-nonetlink']) expect(start).to.include(opt);
    let unitText = text;
    if (!fs.existsSync('/usr/sbin/nbd-client')) {
      // Verify needs executables that exist: stand in for nbd-client where it is not installed.
      const fake = path.join(dir, 'nbd-client');
      fs.writeFileSync(fake, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
      unitText = text.replaceAll('/usr/sbin/nbd-client', fake);
    }
    const unit = path.join(dir, 'nbd-client@nbd0.service');
    fs.writeFileSync(unit, unitText);
    await verify(unit);
  });

  it('nbdtab.example has the nbdtab(5) form: device host export options', function () {
    const lines = fs.readFileSync(path.join(ROOT, 'systemd', 'nbdtab.example'), 'utf8')
      .split('\n').map((l) => l.replace(/#.*/, '').trim()).filter(Boolean);
    expect(lines.length).to.be.greaterThan(0);
    for (const line of lines) {
      const fields = line.split(/\s+/);
      expect(fields, line).to.have.length(4);
      const [dev, , exportName, options] = fields;
      expect(dev, line).to.match(/^nbd\d+$/);
      expect(exportName, line).to.match(/^lun\d+$/);
      const known = /^(port=\d+|conns=\d+|timeout=\d+|persist|bs=\d+|swap|no_optgo|_.*)$/;
      for (const o of options.split(',')) expect(o, line).to.match(known);
    }
  });
});

describe('scripts/install.sh with DESTDIR', function () {
  this.timeout(180_000);
  let dir: string;
  let dest: string;
  let fakeBin: string;
  let systemctlLog: string;

  before(function () {
    expect(fs.existsSync(CLI), `${CLI} (run npm run build)`).to.equal(true);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-install-'));
    dest = path.join(dir, 'root');
    // A systemctl that records being called: install.sh must not call it with DESTDIR.
    fakeBin = path.join(dir, 'bin');
    systemctlLog = path.join(dir, 'systemctl.log');
    fs.mkdirSync(fakeBin);
    fs.writeFileSync(path.join(fakeBin, 'systemctl'), `#!/bin/sh\necho "$@" >> ${JSON.stringify(systemctlLog)}\n`, { mode: 0o755 });
  });
  after(function () {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  function install(): Promise<Run> {
    const env: NodeJS.ProcessEnv = {
      ...process.env, DESTDIR: dest, NBD_MIRROR_SKIP_BUILD: '1', PATH: `${fakeBin}:${process.env.PATH}`,
    };
    for (const k of Object.keys(env)) if (k.startsWith('NBD_MIRROR_') && k !== 'NBD_MIRROR_SKIP_BUILD') delete env[k];
    return run('bash', [path.join(ROOT, 'scripts', 'install.sh')], { env, cwd: dir, timeoutMs: 170_000 });
  }

  it('installs the package, launcher, units and a sample config under DESTDIR', async function () {
    const r = await install();
    expect(r.code, `install.sh failed\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`).to.equal(0);
    const at = (p: string) => path.join(dest, p);
    for (const f of [
      'usr/lib/nbd-mirror/dist/cli.js', 'usr/lib/nbd-mirror/package.json', 'usr/lib/nbd-mirror/README.md',
      'usr/lib/nbd-mirror/node_modules/koffi/package.json', 'usr/lib/nbd-mirror/node_modules/convict/package.json',
      'usr/lib/nbd-mirror/examples/site-b.json', 'usr/lib/nbd-mirror/systemd/nbdtab.example',
      'usr/bin/nbd-mirror', 'etc/systemd/system/nbd-mirror@.service', 'etc/systemd/system/nbd-client@.service',
      'etc/nbd-mirror/site-a.json',
    ]) expect(fs.existsSync(at(f)), f).to.equal(true);
    // Production dependencies only.
    expect(fs.existsSync(at('usr/lib/nbd-mirror/node_modules/typescript')), 'typescript pruned').to.equal(false);
    expect(fs.existsSync(at('usr/lib/nbd-mirror/node_modules/mocha')), 'mocha pruned').to.equal(false);
    // The launcher runs the final path (not the DESTDIR one) with an absolute node.
    const launcher = fs.readFileSync(at('usr/bin/nbd-mirror'), 'utf8');
    expect(launcher).to.match(/^#!\/bin\/sh\n/);
    expect(launcher).to.include('"/usr/lib/nbd-mirror/dist/cli.js" "$@"');
    expect(launcher).to.not.include(dest);
    expect(fs.statSync(at('usr/bin/nbd-mirror')).mode & 0o111, 'executable').to.not.equal(0);
    expect(fs.readFileSync(at('etc/systemd/system/nbd-mirror@.service'), 'utf8'))
      .to.equal(fs.readFileSync(path.join(ROOT, 'systemd', 'nbd-mirror@.service'), 'utf8'));
    expect(JSON.parse(fs.readFileSync(at('etc/nbd-mirror/site-a.json'), 'utf8')))
      .to.deep.equal(JSON.parse(fs.readFileSync(path.join(ROOT, 'examples', 'site-a.json'), 'utf8')));
    expect(r.stdout).to.include('systemctl daemon-reload');
    expect(r.stdout).to.include('systemctl enable --now nbd-mirror@site-a');
    expect(fs.existsSync(systemctlLog), 'systemctl was not called').to.equal(false);
    // No staging leftovers next to the package.
    expect(fs.readdirSync(at('usr/lib')).sort()).to.deep.equal(['nbd-mirror']);
  });

  it('the installed copy runs: config check of a site with a file LUN', async function () {
    const img = path.join(dir, 'lun0.img');
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
    const cfg = path.join(dir, 'site.json');
    fs.writeFileSync(cfg, JSON.stringify({ site: 'x', dataDir: path.join(dir, 'state'), luns: [{ name: 'lun0', path: img }] }));
    const r = await run(process.execPath, [path.join(dest, 'usr/lib/nbd-mirror/dist/cli.js'), 'config', 'check', cfg]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.trim()).to.equal(`${cfg}: ok`);
  });

  it('a second run upgrades in place and keeps an edited configuration', async function () {
    const conf = path.join(dest, 'etc/nbd-mirror/site-a.json');
    fs.writeFileSync(conf, '{"site":"edited"}\n');
    const stale = path.join(dest, 'usr/lib/nbd-mirror/dist/stale-file.js');
    fs.writeFileSync(stale, '');
    const r = await install();
    expect(r.code, `${r.stdout}\n${r.stderr}`).to.equal(0);
    expect(fs.readFileSync(conf, 'utf8')).to.equal('{"site":"edited"}\n');
    expect(r.stdout).to.include('keeping the existing /etc/nbd-mirror/site-a.json');
    expect(fs.existsSync(stale), 'the old package tree was replaced').to.equal(false);
    expect(fs.readdirSync(path.join(dest, 'usr/lib')).sort()).to.deep.equal(['nbd-mirror']);
    expect(fs.existsSync(systemctlLog), 'systemctl was not called').to.equal(false);
  });
});
