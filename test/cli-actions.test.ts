// `nbd-mirror promote|demote|resolve|verify LUN --config FILE` as users run them (`node dist/cli.js`)
// against a fake admin endpoint: an AdminServer with a fake SiteActions on a unix socket named by
// the config file's admin.socket (actions are refused over TCP). Output lines and exit codes.
// Needs dist/ (npm run build).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { ActionError, type RoleChange, type SiteActions, type VerifyReport } from '../src/admin/actions.js';
import { AdminServer } from '../src/admin/server.js';
import { freePort } from './helpers/ports.js';

const CLI = process.env.NBD_MIRROR_CLI
  ?? path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const MiB = 1024 * 1024;

interface Run { code: number | null; signal: string | null; stdout: string; stderr: string }

/** Run the CLI with an environment free of NBD_MIRROR_* overrides. */
function cli(args: string[], timeoutMs = 15_000): Promise<Run> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NBD_MIRROR_')) env[k] = v;
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' },
      (err, stdout, stderr) => {
        const e = err as (Error & { code?: number | string; signal?: string }) | null;
        resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.signal ?? null, stdout, stderr });
      });
  });
}

const lines = (s: string): string[] => s.split('\n').filter((l) => l.length > 0);
const why = (r: Run): string => `exit ${r.code}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;

/**
 * Behaviour by LUN name: "busy" → 409, "nope" → 404, "bad" → 400, "boom" → 500; verify of "same" finds
 * nothing, of "many" five regions, of anything else one region (repaired with repair); "slow" verifies
 * are held until release().
 */
class FakeActions implements SiteActions {
  calls: unknown[][] = [];
  private held: Array<() => void> = [];
  private onHold: () => void = () => undefined;
  /** Resolves when a "slow" verify is waiting. */
  holding = new Promise<void>((r) => { this.onHold = r; });

  release(): void {
    for (const r of this.held.splice(0)) r();
  }

  private refuse(lun: string): void {
    if (lun === 'busy') throw new ActionError('the peer is primary and reachable (use --force)', 409);
    if (lun === 'nope') throw new ActionError(`no LUN "${lun}"`, 404);
    if (lun === 'bad') throw new ActionError('lun is not mirrored', 400);
    if (lun === 'boom') throw new Error('backing store read failed: EIO');
  }

  async promote(lun: string, opts: { force: boolean }): Promise<RoleChange> {
    this.calls.push(['promote', lun, opts]);
    this.refuse(lun);
    return { lun, role: 'primary', notes: opts.force ? ['forced: the peer may still be primary'] : [] };
  }

  async demote(lun: string): Promise<RoleChange> {
    this.calls.push(['demote', lun]);
    this.refuse(lun);
    return { lun, role: 'secondary', notes: [] };
  }

  async resolve(lun: string, discard: 'local' | 'remote'): Promise<RoleChange> {
    this.calls.push(['resolve', lun, discard]);
    this.refuse(lun);
    return { lun, role: discard === 'local' ? 'secondary' : 'primary', notes: [] };
  }

  async verify(lun: string, opts: { repair: boolean }): Promise<VerifyReport> {
    this.calls.push(['verify', lun, opts]);
    this.refuse(lun);
    if (lun === 'slow') await new Promise<void>((r) => { this.held.push(r); this.onHold(); });
    const differing = lun === 'same' ? []
      : lun === 'many' ? [0, 1, 2, 3, 4].map((i) => ({ offset: i * MiB, length: 65536 }))
        : [{ offset: 1048576, length: 65536 }];
    return { lun, bytes: 256 * MiB, regionSize: 65536, differing, repaired: opts.repair ? differing.length : 0, durationMs: 12 };
  }
}

describe('cli: failover commands', function () {
  let dir: string;
  let fake: FakeActions;
  let server: AdminServer;
  let config: string;
  let unreachable: string;

  const writeConfig = (name: string, adminPort: number, socket = path.join(dir, `${name}.sock`)): string => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, JSON.stringify({
      site: 'a', listen: { port: 0 }, admin: { host: '127.0.0.1', port: adminPort, socket }, dataDir: path.join(dir, 'data'),
      luns: [{ name: 'lun0', path: path.join(dir, 'lun0.img') }],
    }, null, 2));
    return file;
  };

  before(async function () {
    expect(fs.existsSync(CLI), `${CLI} missing: run npm run build`).to.equal(true);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cli-actions-'));
    fs.mkdirSync(path.join(dir, 'data'), { mode: 0o700 });
    fs.writeFileSync(path.join(dir, 'lun0.img'), Buffer.alloc(64 * 1024));
    unreachable = writeConfig('closed.json', await freePort());
  });

  after(function () {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  beforeEach(async function () {
    fake = new FakeActions();
    const sock = path.join(dir, 'site.json.sock');
    server = new AdminServer(() => ({ site: 'a', luns: [] }), async () => '', fake, { token: null, socketPath: sock });
    const { port } = await server.listen('127.0.0.1', 0);
    await server.listenSocket(sock);
    config = writeConfig('site.json', port, sock);
  });

  afterEach(async function () {
    fake.release();
    await server.close();
  });

  describe('promote', function () {
    it('prints one line and exits 0', async function () {
      const r = await cli(['promote', 'lun0', '--config', config]);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['lun0: promoted to primary']);
      expect(r.stderr).to.equal('');
      expect(fake.calls).to.deep.equal([['promote', 'lun0', { force: false }]]);
    });

    it('--force is passed on; notes follow the summary', async function () {
      const r = await cli(['promote', 'lun0', '--config', config, '--force']);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['lun0: promoted to primary (forced: the peer may still be primary)']);
      expect(fake.calls).to.deep.equal([['promote', 'lun0', { force: true }]]);
    });

    it('--json prints the body', async function () {
      const r = await cli(['promote', 'lun0', '-c', config, '--json']);
      expect(r.code, why(r)).to.equal(0);
      expect(JSON.parse(r.stdout)).to.deep.equal({ lun: 'lun0', role: 'primary', notes: [] });
    });

    it('refused (409): the message on stderr, exit 1', async function () {
      const r = await cli(['promote', 'busy', '--config', config]);
      expect(r.code, why(r)).to.equal(1);
      expect(r.stdout).to.equal('');
      expect(lines(r.stderr)).to.deep.equal([
        'nbd-mirror: promote busy refused by site "a" (HTTP 409): the peer is primary and reachable (use --force)',
      ]);
    });
  });

  describe('demote', function () {
    it('prints one line and exits 0', async function () {
      const r = await cli(['demote', 'lun0', '--config', config]);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['lun0: demoted to secondary']);
      expect(fake.calls).to.deep.equal([['demote', 'lun0']]);
    });

    it('unknown LUN (404) and bad request (400): exit 2', async function () {
      const a = await cli(['demote', 'nope', '--config', config]);
      expect(a.code, why(a)).to.equal(2);
      expect(lines(a.stderr)).to.deep.equal(['nbd-mirror: demote nope refused by site "a" (HTTP 404): no LUN "nope"']);
      const b = await cli(['demote', 'bad', '--config', config]);
      expect(b.code, why(b)).to.equal(2);
      expect(b.stderr).to.match(/HTTP 400\): lun is not mirrored/);
      // A name the endpoint refuses before any action.
      const c = await cli(['demote', '-x', '--config', config]);
      expect(c.code, why(c)).to.equal(2);
      expect(fake.calls).to.deep.equal([['demote', 'nope'], ['demote', 'bad']]);
    });

    it('a failure inside the site (500): exit 1', async function () {
      const r = await cli(['demote', 'boom', '--config', config]);
      expect(r.code, why(r)).to.equal(1);
      expect(r.stderr).to.match(/HTTP 500\): backing store read failed: EIO/);
    });
  });

  describe('resolve', function () {
    it('--discard-local / --discard-remote', async function () {
      const a = await cli(['resolve', 'lun0', '--config', config, '--discard-local']);
      expect(a.code, why(a)).to.equal(0);
      expect(lines(a.stdout)).to.deep.equal(['lun0: split brain resolved, local changes discarded; now secondary']);
      const b = await cli(['resolve', 'lun0', '--discard-remote', '--config', config]);
      expect(b.code, why(b)).to.equal(0);
      expect(lines(b.stdout)).to.deep.equal(['lun0: split brain resolved, remote changes discarded; now primary']);
      expect(fake.calls).to.deep.equal([['resolve', 'lun0', 'local'], ['resolve', 'lun0', 'remote']]);
    });

    it('both or neither discard flag: usage error, exit 2, nothing asked', async function () {
      for (const args of [['resolve', 'lun0', '--config', config],
        ['resolve', 'lun0', '--config', config, '--discard-local', '--discard-remote']]) {
        const r = await cli(args);
        expect(r.code, why(r)).to.equal(2);
        expect(r.stdout).to.equal('');
        expect(lines(r.stderr)[0]).to.equal('nbd-mirror: resolve needs exactly one of --discard-local and --discard-remote');
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('refused (409): exit 1', async function () {
      const r = await cli(['resolve', 'busy', '--config', config, '--discard-remote']);
      expect(r.code, why(r)).to.equal(1);
      expect(r.stderr).to.match(/resolve busy refused by site "a" \(HTTP 409\)/);
    });
  });

  describe('verify', function () {
    it('identical copies: exit 0', async function () {
      const r = await cli(['verify', 'same', '--config', config]);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['same: 256.0 MiB compared, copies are identical']);
      expect(fake.calls).to.deep.equal([['verify', 'same', { repair: false }]]);
    });

    it('differences without --repair: exit 1', async function () {
      const r = await cli(['verify', 'lun0', '--config', config]);
      expect(r.code, why(r)).to.equal(1);
      expect(lines(r.stdout)).to.deep.equal([
        'lun0: 256.0 MiB compared, 1 region differs (offset 1048576, 65536 bytes); not repaired (run again with --repair to resend them from the primary)',
      ]);
    });

    it('differences with --repair: repaired, exit 0', async function () {
      const r = await cli(['verify', 'lun0', '--config', config, '--repair']);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['lun0: 256.0 MiB compared, 1 region differs (offset 1048576, 65536 bytes); repaired']);
      expect(fake.calls).to.deep.equal([['verify', 'lun0', { repair: true }]]);
    });

    it('many regions are summarised', async function () {
      const r = await cli(['verify', 'many', '--config', config]);
      expect(r.code, why(r)).to.equal(1);
      expect(lines(r.stdout)[0]).to.match(/^many: 256\.0 MiB compared, 5 regions differ \(327680 bytes in all, first at offset 0; --json lists them\); not repaired/);
    });

    it('--json prints the report; the exit code still says whether differences are left', async function () {
      const r = await cli(['verify', 'lun0', '--config', config, '--json']);
      expect(r.code, why(r)).to.equal(1);
      expect(JSON.parse(r.stdout)).to.deep.equal({
        lun: 'lun0', bytes: 256 * MiB, regionSize: 65536, differing: [{ offset: 1048576, length: 65536 }], repaired: 0, durationMs: 12,
      });
      const s = await cli(['verify', 'same', '--config', config, '--json']);
      expect(s.code, why(s)).to.equal(0);
      expect(JSON.parse(s.stdout).differing).to.deep.equal([]);
    });

    it('waits for a verify still running', async function () {
      const run = cli(['verify', 'slow', '--config', config, '--repair']);
      await fake.holding;
      fake.release();
      const r = await run;
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['slow: 256.0 MiB compared, 1 region differs (offset 1048576, 65536 bytes); repaired']);
    });

    it('refused: 409 → exit 1, 404 → exit 2', async function () {
      const a = await cli(['verify', 'busy', '--config', config]);
      expect(a.code, why(a)).to.equal(1);
      const b = await cli(['verify', 'nope', '--config', config, '--repair']);
      expect(b.code, why(b)).to.equal(2);
      expect(b.stdout).to.equal('');
    });
  });

  describe('--admin: the admin address alone, no configuration file', function () {
    it('--admin SOCKET runs the action; status --admin HOST:PORT reads the status', async function () {
      const sock = path.join(dir, 'site.json.sock');
      const r = await cli(['promote', 'lun0', '--admin', sock]);
      expect(r.code, why(r)).to.equal(0);
      expect(lines(r.stdout)).to.deep.equal(['lun0: promoted to primary']);
      expect(fake.calls).to.deep.equal([['promote', 'lun0', { force: false }]]);
      const port = JSON.parse(fs.readFileSync(config, 'utf8')).admin.port as number;
      const st = await cli(['status', '--admin', `127.0.0.1:${port}`, '--json']);
      expect(st.code, why(st)).to.equal(0);
      expect(JSON.parse(st.stdout)).to.deep.equal({ site: 'a', luns: [] });
    });

    it('--admin HOST:PORT without a token: refused by the site (403) → exit 2, nothing done', async function () {
      const port = JSON.parse(fs.readFileSync(config, 'utf8')).admin.port as number;
      const r = await cli(['demote', 'lun0', '--admin', `127.0.0.1:${port}`]);
      expect(r.code, why(r)).to.equal(2);
      expect(r.stderr).to.match(/HTTP 403.*admin socket/);
      expect(fake.calls).to.deep.equal([]);
    });

    it('a bad --admin address, or --token-file with a socket → exit 2', async function () {
      const a = await cli(['demote', 'lun0', '--admin', 'nowhere']);
      expect(a.code, why(a)).to.equal(2);
      expect(a.stderr).to.include('--admin takes HOST:PORT or the path of the admin socket');
      const b = await cli(['demote', 'lun0', '--admin', path.join(dir, 'x.sock'), '--token-file', config]);
      expect(b.code, why(b)).to.equal(2);
      expect(fake.calls).to.deep.equal([]);
    });
  });

  describe('usage and reachability', function () {
    for (const cmd of ['promote', 'demote', 'resolve', 'verify']) {
      it(`${cmd}: missing LUN, missing --config, extra argument, unknown option → exit 2; --help → exit 0`, async function () {
        const discard = cmd === 'resolve' ? ['--discard-local'] : [];
        const noLun = await cli([cmd, '--config', config, ...discard]);
        expect(noLun.code, why(noLun)).to.equal(2);
        expect(lines(noLun.stderr)[0]).to.equal(`nbd-mirror: ${cmd} needs a LUN name`);
        expect(noLun.stderr).to.include(`Usage: nbd-mirror ${cmd} LUN --config FILE`);
        const noConfig = await cli([cmd, 'lun0', ...discard]);
        expect(noConfig.code, why(noConfig)).to.equal(2);
        expect(lines(noConfig.stderr)[0]).to.equal(`nbd-mirror: ${cmd} needs --config FILE or --admin ADDR`);
        const extra = await cli([cmd, 'lun0', 'lun1', '--config', config, ...discard]);
        expect(extra.code, why(extra)).to.equal(2);
        expect(lines(extra.stderr)[0]).to.equal(`nbd-mirror: ${cmd}: unexpected argument "lun1"`);
        const unknown = await cli([cmd, 'lun0', '--config', config, '--frobnicate', ...discard]);
        expect(unknown.code, why(unknown)).to.equal(2);
        expect(unknown.stderr).to.match(/Unknown option '--frobnicate'/);
        const help = await cli([cmd, '--help']);
        expect(help.code, why(help)).to.equal(0);
        expect(help.stdout).to.match(new RegExp(`^Usage: nbd-mirror ${cmd} LUN --config FILE`));
        expect(fake.calls).to.deep.equal([]);
      });

      it(`${cmd}: nothing listening → exit 3`, async function () {
        const discard = cmd === 'resolve' ? ['--discard-remote'] : [];
        const r = await cli([cmd, 'lun0', '--config', unreachable, ...discard]);
        expect(r.code, why(r)).to.equal(3);
        expect(r.stdout).to.equal('');
        expect(lines(r.stderr)).to.have.length(1);
        expect(r.stderr).to.match(/^nbd-mirror: site "a" not reachable at \/\S+closed\.json\.sock: .*ENOENT/);
      });
    }

    it('a bad config file → exit 2', async function () {
      const r = await cli(['promote', 'lun0', '--config', path.join(dir, 'missing.json')]);
      expect(r.code, why(r)).to.equal(2);
      expect(r.stderr).to.match(/^nbd-mirror: config error: /);
    });

    it('the main help lists the failover commands', async function () {
      const r = await cli(['--help']);
      expect(r.code).to.equal(0);
      for (const usage of ['nbd-mirror promote LUN --config FILE [--force]', 'nbd-mirror demote LUN --config FILE',
        'nbd-mirror resolve LUN --config FILE (--discard-local | --discard-remote)',
        'nbd-mirror verify LUN --config FILE [--repair] [--json]']) {
        expect(r.stdout).to.include(usage);
      }
    });

    it('the connection breaks before an answer: exit 1 (the action may have happened), not 3', async function () {
      const sockets = new Set<net.Socket>();
      const breaker = net.createServer((s) => {
        sockets.add(s);
        s.once('data', () => s.destroy());
      });
      const sock = path.join(dir, 'breaker.sock');
      await new Promise<void>((r) => breaker.listen(sock, () => r()));
      try {
        const cfg = writeConfig('breaker.json', 1, sock);
        const r = await cli(['demote', 'lun0', '--config', cfg]);
        expect(r.code, why(r)).to.equal(1);
        expect(r.stderr).to.match(/^nbd-mirror: demote lun0: .*; check 'nbd-mirror status --config /);
      } finally {
        for (const s of sockets) s.destroy();
        await new Promise<void>((r) => breaker.close(() => r()));
      }
    });
  });
});
