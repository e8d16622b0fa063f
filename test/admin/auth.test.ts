// The admin endpoint of a real site: operator actions only on its owner-only unix socket (or over
// TCP with the token of admin.tokenFile); GET /status stays open on TCP. The CLI reaches it with
// --config, or with the admin address alone (no LUN paths, no key files).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import { expect } from 'chai';
import { cliPath, Cleanup, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

interface Run { code: number | null; stdout: string; stderr: string }

function cli(args: string[], prefix: string[] = []): Promise<Run> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NBD_MIRROR_')) env[k] = v;
  const [file, argv] = prefix.length ? [prefix[0], [...prefix.slice(1), process.execPath, cliPath(), ...args]] : [process.execPath, [cliPath(), ...args]];
  return new Promise((resolve) => {
    execFile(file, argv, { env, timeout: 20_000, killSignal: 'SIGKILL', encoding: 'utf8' }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr });
    });
  });
}

function post(to: { port: number } | { socketPath: string }, path: string, headers: Record<string, string> = {}): Promise<{ status: number; body: { error?: string } }> {
  return new Promise((resolve, reject) => {
    const where = 'socketPath' in to ? to : { host: '127.0.0.1', port: to.port };
    const req = http.request({ ...where, method: 'POST', path, agent: false, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('admin: authentication of operator actions (real site)', function () {
  this.timeout(60_000);
  const cleanup = new Cleanup();
  let site: Site;
  let tokenFile: string;
  const token = 'operator-token-5f1c2e9a7b3d4c60';

  before(async function () {
    const dir = await tmpDir('nbd-mirror-auth-');
    cleanup.add('dir', () => dir.cleanup());
    const image = await sparseFile(dir.join('lun0.img'), 4 << 20);
    tokenFile = dir.join('admin.token');
    fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
    site = await startSite({ luns: [{ name: 'lun0', path: image, role: 'primary', mirror: 'none' }], admin: { tokenFile } });
    cleanup.add('site', () => site.stop());
  });
  after(() => cleanup.run());

  it('the socket is under dataDir, mode 0600, owned by the site\'s user', function () {
    expect(site.adminSocket.startsWith(site.config.dataDir)).to.equal(true);
    const st = fs.statSync(site.adminSocket);
    expect(st.isSocket()).to.equal(true);
    expect(st.mode & 0o777).to.equal(0o600);
    expect(st.uid).to.equal(process.getuid!());
  });

  it('TCP: an action without the token is refused (401) and not run; with it, it reaches the site', async function () {
    const none = await post({ port: site.adminPort }, '/luns/lun0/demote');
    expect(none.status).to.equal(401);
    expect(none.body.error).to.include('admin.tokenFile');
    const wrong = await post({ port: site.adminPort }, '/luns/lun0/demote', { authorization: 'Bearer operator-token-5f1c2e9a7b3d4c6X' });
    expect(wrong.status).to.equal(401);
    // A standalone site refuses role changes (409): the request got past authentication.
    const ok = await post({ port: site.adminPort }, '/luns/lun0/demote', { authorization: `Bearer ${token}` });
    expect(ok.status).to.equal(409);
    expect(ok.body.error).to.match(/no mirror section/);
    const sock = await post({ socketPath: site.adminSocket }, '/luns/lun0/demote');
    expect(sock.status).to.equal(409);
    expect(site.isAlive()).to.equal(true);
  });

  it('CLI: --config uses the socket; --admin SOCKET and --admin HOST:PORT --token-file need no config file', async function () {
    const viaConfig = await cli(['demote', 'lun0', '--config', site.configPath]);
    expect(viaConfig.code, viaConfig.stderr).to.equal(1);
    expect(viaConfig.stderr).to.match(/HTTP 409.*no mirror section/);
    const viaSocket = await cli(['demote', 'lun0', '--admin', site.adminSocket]);
    expect(viaSocket.code, viaSocket.stderr).to.equal(1);
    expect(viaSocket.stderr).to.match(/HTTP 409/);
    const tcpToken = await cli(['demote', 'lun0', '--admin', `127.0.0.1:${site.adminPort}`, '--token-file', tokenFile]);
    expect(tcpToken.code, tcpToken.stderr).to.equal(1);
    expect(tcpToken.stderr).to.match(/HTTP 409/);
    const tcpNoToken = await cli(['demote', 'lun0', '--admin', `127.0.0.1:${site.adminPort}`]);
    expect(tcpNoToken.code, tcpNoToken.stderr).to.equal(2);
    expect(tcpNoToken.stderr).to.match(/HTTP 401/);
    const status = await cli(['status', '--admin', `127.0.0.1:${site.adminPort}`, '--json']);
    expect(status.code, status.stderr).to.equal(0);
    expect(JSON.parse(status.stdout).luns.map((l: { name: string }) => l.name)).to.deep.equal(['lun0']);
  });

  it('another local user: status works over TCP, the socket is out of reach (exit 3, nothing done)', async function () {
    const asNobody = ['/usr/sbin/runuser', '-u', 'nobody', '--'];
    const status = await cli(['status', '--admin', `127.0.0.1:${site.adminPort}`], asNobody);
    expect(status.code, status.stderr).to.equal(0);
    expect(status.stdout).to.include('lun0');
    const action = await cli(['demote', 'lun0', '--admin', site.adminSocket], asNobody);
    expect(action.code, action.stderr).to.equal(3);
    expect(action.stderr).to.match(/not reachable at .*admin\.sock: .*(EACCES|ENOENT)/);
    const tcp = await cli(['demote', 'lun0', '--admin', `127.0.0.1:${site.adminPort}`], asNobody);
    expect(tcp.code, tcp.stderr).to.equal(2);
  });
});
