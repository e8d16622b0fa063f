// The admin endpoint's operator actions (POST /luns/NAME/promote|demote|resolve|verify) against a
// fake SiteActions: routing, query parsing, status codes and bodies; the postAction client.
import { expect } from 'chai';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ActionError, type RoleChange, type SiteActions, type VerifyReport } from '../../src/admin/actions.js';
import { AdminUnreachableError, postAction } from '../../src/admin/client.js';
import { AdminServer } from '../../src/admin/server.js';
import { freePort } from '../helpers/ports.js';

type Call = [string, ...unknown[]];

/** Records every call; `failWith` makes the next call throw; `hold` makes verify wait for release(). */
class FakeActions implements SiteActions {
  calls: Call[] = [];
  failWith: Error | null = null;
  private held: Array<() => void> = [];
  holdVerify = false;
  /** Resolves when a held verify has started (the request reached the action). */
  verifyStarted: Promise<void> = Promise.resolve();
  private markStarted: () => void = () => undefined;

  armHold(): void {
    this.holdVerify = true;
    this.verifyStarted = new Promise((r) => { this.markStarted = r; });
  }

  release(): void {
    for (const r of this.held.splice(0)) r();
  }

  private next(): void {
    const err = this.failWith;
    this.failWith = null;
    if (err) throw err;
  }

  async promote(lun: string, opts: { force: boolean }): Promise<RoleChange> {
    this.calls.push(['promote', lun, opts]);
    this.next();
    return { lun, role: 'primary', notes: opts.force ? ['forced'] : [] };
  }

  async demote(lun: string): Promise<RoleChange> {
    this.calls.push(['demote', lun]);
    this.next();
    return { lun, role: 'secondary', notes: [] };
  }

  async resolve(lun: string, discard: 'local' | 'remote'): Promise<RoleChange> {
    this.calls.push(['resolve', lun, discard]);
    this.next();
    return { lun, role: discard === 'local' ? 'secondary' : 'primary', notes: [] };
  }

  async verify(lun: string, opts: { repair: boolean }): Promise<VerifyReport> {
    this.calls.push(['verify', lun, opts]);
    this.next();
    if (this.holdVerify) {
      await new Promise<void>((r) => { this.held.push(r); this.markStarted(); });
    }
    const differing = [{ offset: 1048576, length: 65536 }];
    return { lun, bytes: 256 * 1048576, regionSize: 65536, differing, repaired: opts.repair ? 1 : 0, durationMs: 5 };
  }
}

interface Answer { status: number; headers: http.IncomingHttpHeaders; body: any }

/** `to`: a TCP port on 127.0.0.1, or the path of the admin socket. */
function request(to: number | string, method: string, path: string, headers: Record<string, string> = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const where = typeof to === 'string' ? { socketPath: to } : { host: '127.0.0.1', port: to };
    const req = http.request({ ...where, method, path, agent: false, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve({ status: res.statusCode!, headers: res.headers, body: JSON.parse(text) });
        } catch (err) {
          reject(new Error(`${method} ${path}: not JSON (${res.statusCode}): ${text}`));
        }
      });
    });
    req.on('error', reject);
    req.end();
  });
}

describe('admin endpoint: operator actions', function () {
  let fake: FakeActions;
  let server: AdminServer;
  let port: number;
  let dir: string;
  let sock: string;
  const post = (path: string) => request(sock, 'POST', path);

  beforeEach(async function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-admin-'));
    sock = path.join(dir, 'admin.sock');
    fake = new FakeActions();
    server = new AdminServer(() => ({ site: 'a', luns: [] }), async () => '# metrics\n', fake, { token: null, socketPath: sock });
    port = (await server.listen('127.0.0.1', 0)).port;
    await server.listenSocket(sock);
  });

  afterEach(async function () {
    fake.release();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('routing and query parsing', function () {
    it('promote: force defaults to false; force=1 forces', async function () {
      const a = await post('/luns/lun0/promote');
      expect(a.status).to.equal(200);
      expect(a.headers['content-type']).to.equal('application/json');
      expect(a.body).to.deep.equal({ lun: 'lun0', role: 'primary', notes: [] });
      const b = await post('/luns/lun0/promote?force=1');
      expect(b.status).to.equal(200);
      expect(b.body.notes).to.deep.equal(['forced']);
      await post('/luns/lun0/promote?force=0');
      await post('/luns/lun0/promote?force=true');
      expect(fake.calls).to.deep.equal([
        ['promote', 'lun0', { force: false }],
        ['promote', 'lun0', { force: true }],
        ['promote', 'lun0', { force: false }],
        ['promote', 'lun0', { force: true }],
      ]);
    });

    it('demote', async function () {
      const a = await post('/luns/db-1/demote');
      expect(a.status).to.equal(200);
      expect(a.body).to.deep.equal({ lun: 'db-1', role: 'secondary', notes: [] });
      expect(fake.calls).to.deep.equal([['demote', 'db-1']]);
    });

    it('resolve: discard=local and discard=remote', async function () {
      expect((await post('/luns/lun0/resolve?discard=local')).body.role).to.equal('secondary');
      expect((await post('/luns/lun0/resolve?discard=remote')).body.role).to.equal('primary');
      expect(fake.calls).to.deep.equal([['resolve', 'lun0', 'local'], ['resolve', 'lun0', 'remote']]);
    });

    it('verify: repair defaults to false; repair=1 repairs; the report is the body', async function () {
      const a = await post('/luns/lun0/verify');
      expect(a.status).to.equal(200);
      expect(a.body).to.deep.include({ lun: 'lun0', bytes: 256 * 1048576, regionSize: 65536, repaired: 0 });
      expect(a.body.differing).to.deep.equal([{ offset: 1048576, length: 65536 }]);
      expect((await post('/luns/lun0/verify?repair=1')).body.repaired).to.equal(1);
      expect(fake.calls).to.deep.equal([['verify', 'lun0', { repair: false }], ['verify', 'lun0', { repair: true }]]);
    });

    it('URL-decodes the LUN name', async function () {
      const a = await post(`/luns/${encodeURIComponent('a.b_c-d')}/demote`);
      expect(a.status).to.equal(200);
      await post('/luns/%6Cun0/demote');
      expect(fake.calls).to.deep.equal([['demote', 'a.b_c-d'], ['demote', 'lun0']]);
    });

    it('accepts a 128-character name, refuses 129', async function () {
      const ok = 'x'.repeat(128);
      expect((await post(`/luns/${ok}/demote`)).status).to.equal(200);
      const long = await post(`/luns/${ok}x/demote`);
      expect(long.status).to.equal(400);
      expect(long.body.error).to.match(/bad LUN name/);
      expect(fake.calls).to.deep.equal([['demote', ok]]);
    });
  });

  describe('refusals and errors', function () {
    it('ActionError 409 → 409 { error }', async function () {
      fake.failWith = new ActionError('the peer is primary and reachable; use force', 409);
      const a = await post('/luns/lun0/promote');
      expect(a.status).to.equal(409);
      expect(a.body).to.deep.equal({ error: 'the peer is primary and reachable; use force' });
    });

    it('ActionError 404 → 404 { error }', async function () {
      fake.failWith = new ActionError('no LUN "nope"', 404);
      const a = await post('/luns/nope/demote');
      expect(a.status).to.equal(404);
      expect(a.body).to.deep.equal({ error: 'no LUN "nope"' });
    });

    it('ActionError 400 → 400; ActionError without a status → 409', async function () {
      fake.failWith = new ActionError('not mirrored', 400);
      expect((await post('/luns/lun0/verify')).status).to.equal(400);
      fake.failWith = new ActionError('busy');
      const b = await post('/luns/lun0/demote');
      expect(b.status).to.equal(409);
      expect(b.body).to.deep.equal({ error: 'busy' });
    });

    it('any other error → 500 { error }, and the endpoint keeps serving', async function () {
      fake.failWith = new Error('disk on fire');
      const a = await post('/luns/lun0/verify');
      expect(a.status).to.equal(500);
      expect(a.body).to.deep.equal({ error: 'disk on fire' });
      expect((await request(port, 'GET', '/status')).status).to.equal(200);
    });

    it('unknown action → 404 (whatever the method)', async function () {
      for (const method of ['POST', 'GET']) {
        const a = await request(sock, method, '/luns/lun0/explode');
        expect(a.status, method).to.equal(404);
        expect(a.body.error).to.match(/no such action "explode"/);
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('GET (or PUT, DELETE) on an action path → 405 with Allow: POST', async function () {
      for (const [method, path] of [['GET', '/luns/lun0/promote'], ['GET', '/luns/lun0/verify?repair=1'],
        ['PUT', '/luns/lun0/demote'], ['DELETE', '/luns/lun0/resolve?discard=local']]) {
        const a = await request(port, method, path);
        expect(a.status, `${method} ${path}`).to.equal(405);
        expect(a.headers.allow).to.equal('POST');
        expect(a.body.error).to.match(/method not allowed/);
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('bad or missing discard → 400', async function () {
      for (const path of ['/luns/lun0/resolve', '/luns/lun0/resolve?discard=', '/luns/lun0/resolve?discard=both',
        '/luns/lun0/resolve?discard=LOCAL', '/luns/lun0/resolve?discard=local&discard=remote']) {
        const a = await post(path);
        expect(a.status, path).to.equal(400);
        expect(a.body.error, path).to.be.a('string').and.match(/discard/);
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('bad flag values and unknown parameters → 400', async function () {
      for (const path of ['/luns/lun0/promote?force=yes', '/luns/lun0/verify?repair=2', '/luns/lun0/verify?repiar=1',
        '/luns/lun0/demote?force=1', '/luns/lun0/promote?discard=local']) {
        const a = await post(path);
        expect(a.status, path).to.equal(400);
        expect(a.body.error, path).to.be.a('string');
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('bad LUN names → 400', async function () {
      for (const name of ['-lun', '.hidden', '_x', 'a%2Fb', 'a%20b', '%2Eh', '%E2%82%AC', 'lun%00', '%ZZ', 'a:b']) {
        const a = await post(`/luns/${name}/demote`);
        expect(a.status, name).to.equal(400);
        expect(a.body.error, name).to.match(/bad LUN name/);
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('other paths under /luns → 404; GET /status and /metrics unchanged, POST on them → 405', async function () {
      expect((await post('/luns/lun0')).status).to.equal(404);
      expect((await post('/luns/lun0/promote/now')).status).to.equal(404);
      expect((await post('/luns//promote')).status).to.equal(404);
      const s = await request(port, 'GET', '/status');
      expect(s.status).to.equal(200);
      expect(s.body).to.deep.equal({ site: 'a', luns: [] });
      expect((await post('/status')).status).to.equal(405);
      expect((await post('/metrics')).status).to.equal(405);
    });
  });

  it('without SiteActions: 501 with a clear message', async function () {
    const bare = new AdminServer(() => ({}), async () => '');
    const p = path.join(dir, 'bare.sock');
    await bare.listenSocket(p);
    try {
      const a = await request(p, 'POST', '/luns/lun0/promote');
      expect(a.status).to.equal(501);
      expect(a.body.error).to.match(/operator actions are not available/);
      // Validation still comes first.
      expect((await request(p, 'POST', '/luns/-x/promote')).status).to.equal(400);
      expect((await request(p, 'GET', '/luns/lun0/promote')).status).to.equal(405);
    } finally {
      await bare.close();
    }
  });

  it('a verify answers when it is done: no server-side request timeout', async function () {
    expect((server as unknown as { server: http.Server }).server.requestTimeout).to.equal(0);
    fake.armHold();
    const answer = post('/luns/lun0/verify');
    await fake.verifyStarted;
    fake.release();
    const a = await answer;
    expect(a.status).to.equal(200);
    expect(a.body.lun).to.equal('lun0');
  });

  describe('postAction (client)', function () {
    it('resolves with status and body, for 200 and refusals alike', async function () {
      const ok = await postAction({ socketPath: sock }, 'lun0', 'promote', { force: '1' }, 5000);
      expect(ok).to.deep.equal({ status: 200, body: { lun: 'lun0', role: 'primary', notes: ['forced'] } });
      fake.failWith = new ActionError('peer is primary', 409);
      const refused = await postAction({ socketPath: sock }, 'lun0', 'demote', {}, 5000);
      expect(refused).to.deep.equal({ status: 409, body: { error: 'peer is primary' } });
      const bad = await postAction({ socketPath: sock }, 'lun0', 'resolve', { discard: 'both' }, 5000);
      expect(bad.status).to.equal(400);
      expect(fake.calls).to.deep.equal([['promote', 'lun0', { force: true }], ['demote', 'lun0']]);
    });

    it('encodes the LUN name and the query', async function () {
      const a = await postAction({ socketPath: sock }, 'a b', 'demote', {}, 5000);
      expect(a.status).to.equal(400);
      expect((a.body as { error: string }).error).to.match(/bad LUN name "a b"/);
      await postAction({ socketPath: sock }, 'lun.0', 'resolve', { discard: 'remote' }, 5000);
      expect(fake.calls).to.deep.equal([['resolve', 'lun.0', 'remote']]);
    });

    it('timeout 0 waits for a held verify', async function () {
      fake.armHold();
      const answer = postAction({ socketPath: sock }, 'lun0', 'verify', { repair: '1' }, 0);
      await fake.verifyStarted;
      fake.release();
      const a = await answer;
      expect(a.status).to.equal(200);
      expect((a.body as { repaired: number }).repaired).to.equal(1);
    });

    it('rejects with AdminUnreachableError when nothing listens', async function () {
      const closed = await freePort();
      let err: unknown;
      try {
        await postAction({ host: '127.0.0.1', port: closed }, 'lun0', 'demote', {}, 5000);
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(AdminUnreachableError);
    });
  });

  describe('authentication', function () {
    it('over TCP: GET /status and /metrics are open, every action is refused (403) and not run', async function () {
      expect((await request(port, 'GET', '/status')).status).to.equal(200);
      for (const p of ['/luns/lun0/promote?force=1', '/luns/lun0/demote', '/luns/lun0/resolve?discard=local', '/luns/lun0/verify?repair=1']) {
        const a = await request(port, 'POST', p);
        expect(a.status, p).to.equal(403);
        expect(a.body.error, p).to.include(sock);
      }
      expect(fake.calls).to.deep.equal([]);
    });

    it('the socket is mode 0600 and takes actions; close() removes it', async function () {
      expect(fs.statSync(sock).mode & 0o777).to.equal(0o600);
      expect((await post('/luns/lun0/demote')).status).to.equal(200);
      expect(fake.calls).to.deep.equal([['demote', 'lun0']]);
      await server.close();
      expect(fs.existsSync(sock)).to.equal(false);
    });

    it('a leftover socket file is replaced; a live one, or a file that is not a socket, is refused', async function () {
      const other = new AdminServer(() => ({}), async () => '');
      let err: unknown;
      try { await other.listenSocket(sock); } catch (e) { err = e; }
      expect((err as NodeJS.ErrnoException)?.code).to.equal('EADDRINUSE');
      // A socket file nobody listens on (a crashed site): taken over.
      const stale = path.join(dir, 'stale.sock');
      const dead = net.createServer();
      await new Promise<void>((r) => dead.listen(stale, () => r()));
      fs.linkSync(stale, `${stale}.keep`);
      await new Promise<void>((r) => dead.close(() => r()));
      fs.renameSync(`${stale}.keep`, stale);
      await other.listenSocket(stale);
      expect((await request(stale, 'GET', '/status')).status).to.equal(200);
      await other.close();
      const plain = path.join(dir, 'plain');
      fs.writeFileSync(plain, 'keep me');
      const third = new AdminServer(() => ({}), async () => '');
      err = undefined;
      try { await third.listenSocket(plain); } catch (e) { err = e; }
      expect((err as Error)?.message).to.match(/not a socket/);
      expect(fs.readFileSync(plain, 'utf8')).to.equal('keep me');
    });

    it('with a token: TCP actions need "Authorization: Bearer TOKEN" (401 without or wrong)', async function () {
      const token = 'a-long-secret-token-0123456789';
      const tok = new AdminServer(() => ({}), async () => '', fake, { token, socketPath: null });
      const p = (await tok.listen('127.0.0.1', 0)).port;
      try {
        const none = await request(p, 'POST', '/luns/lun0/demote');
        expect(none.status).to.equal(401);
        expect(none.headers['www-authenticate']).to.equal('Bearer');
        expect((await request(p, 'POST', '/luns/lun0/demote', { authorization: 'Bearer wrong' })).status).to.equal(401);
        expect((await request(p, 'POST', '/luns/lun0/demote', { authorization: `Bearer ${token}x` })).status).to.equal(401);
        expect(fake.calls).to.deep.equal([]);
        expect((await request(p, 'POST', '/luns/lun0/demote', { authorization: `Bearer ${token}` })).status).to.equal(200);
        const viaClient = await postAction({ host: '127.0.0.1', port: p, token }, 'lun0', 'promote', {}, 5000);
        expect(viaClient.status).to.equal(200);
        expect(fake.calls).to.deep.equal([['demote', 'lun0'], ['promote', 'lun0', { force: false }]]);
      } finally {
        await tok.close();
      }
    });

    it('postAction to a socket nobody listens on: AdminUnreachableError', async function () {
      let err: unknown;
      try { await postAction({ socketPath: path.join(dir, 'none.sock') }, 'lun0', 'demote', {}, 5000); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(AdminUnreachableError);
    });
  });
});
