// NBD STARTTLS for hosts (listen.tls) and per-LUN allowedNetworks. First an in-process NbdServer
// driven byte by byte (raw options before TLS, Node's TLS client after STARTTLS), then real sites
// driven by libnbd (nbdinfo, nbdcopy), qemu-io/qemu-img and nbd-client, over a pre-shared key and
// over X.509 certificates made by openssl for this run.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import tls from 'node:tls';
import type { SiteConfig } from '../../src/config/schema.js';
import { Lun } from '../../src/lun/lun.js';
import { LunRegistry } from '../../src/lun/registry.js';
import { CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT, REP } from '../../src/nbd/constants.js';
import { NbdServer, type HostTls } from '../../src/nbd/server.js';
import { loadHostCredentials } from '../../src/security/credentials.js';
import { Backing } from '../../src/storage/backing.js';
import { RawNbdClient } from '../helpers/nbd-raw.js';
import { Cleanup, exec, execNoThrow, pollUntil, readAt, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';
import { infoPayload, metaPayload, NbdTestClient, silentLogger, u32, WAIT_MS } from './support.js';

const MiB = 1024 * 1024;
const LUN_SIZE = 4 * MiB;
const IDENTITY = 'alice';

// ---- credentials for this run ------------------------------------------------------------------

interface Pki {
  dir: TmpDir;
  /** psktool-format file with IDENTITY's key (what the server and libnbd read). */
  pskFile: string;
  key: Buffer;
  /** Same identity, another key. */
  wrongPskFile: string;
  /** qemu's tls-creds-psk directory (keys.psk). */
  qemuPskDir: string;
  ca: string;
  serverCert: string;
  serverKey: string;
  /** libnbd's / qemu's tls-certificates directory: ca-cert.pem, client-cert.pem, client-key.pem. */
  clientDir: string;
  /** A client certificate from a CA the server does not trust. */
  rogueCert: string;
  rogueKey: string;
}

async function openssl(...args: string[]): Promise<void> {
  await exec('openssl', args, { timeoutMs: 30_000 });
}

/** A CA, and under it a key and certificate for `subject` (extensions as openssl -extfile lines). */
async function issue(dir: TmpDir, name: string, subject: string, ext: string[], ca: { cert: string; key: string } | null): Promise<{ cert: string; key: string }> {
  const key = dir.join(`${name}-key.pem`);
  const cert = dir.join(`${name}-cert.pem`);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-subj', subject];
  if (!ca) {
    await openssl('req', '-x509', ...ec, '-out', cert, '-days', '2');
  } else {
    const csr = dir.join(`${name}.csr`);
    const extFile = dir.join(`${name}.ext`);
    await fs.writeFile(extFile, `${ext.join('\n')}\n`);
    await openssl('req', ...ec, '-out', csr);
    await openssl('x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', extFile);
  }
  await fs.chmod(key, 0o600);
  return { cert, key };
}

async function makePki(): Promise<Pki> {
  const dir = await tmpDir('nbd-mirror-pki-');
  try {
    const key = randomBytes(32);
    const pskFile = dir.join('hosts.psk');
    await fs.writeFile(pskFile, `${IDENTITY}:${key.toString('hex')}\n`, { mode: 0o600 });
    const wrongPskFile = dir.join('wrong.psk');
    await fs.writeFile(wrongPskFile, `${IDENTITY}:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    const qemuPskDir = dir.join('qemu-psk');
    await fs.mkdir(qemuPskDir);
    await fs.copyFile(pskFile, `${qemuPskDir}/keys.psk`);

    const ca = await issue(dir, 'ca', '/CN=nbd-mirror test CA', [], null);
    const server = await issue(dir, 'server', '/CN=nbd-mirror test site', [
      'subjectAltName=IP:127.0.0.1,DNS:localhost', 'extendedKeyUsage=serverAuth', 'basicConstraints=CA:FALSE',
    ], ca);
    const client = await issue(dir, 'client', '/CN=test host', ['extendedKeyUsage=clientAuth', 'basicConstraints=CA:FALSE'], ca);
    const clientDir = dir.join('client');
    await fs.mkdir(clientDir);
    await fs.copyFile(ca.cert, `${clientDir}/ca-cert.pem`);
    await fs.copyFile(client.cert, `${clientDir}/client-cert.pem`);
    await fs.copyFile(client.key, `${clientDir}/client-key.pem`);
    const rogueCa = await issue(dir, 'rogue-ca', '/CN=someone else\'s CA', [], null);
    const rogue = await issue(dir, 'rogue', '/CN=test host', ['extendedKeyUsage=clientAuth'], rogueCa);
    return {
      dir, pskFile, key, wrongPskFile, qemuPskDir, ca: ca.cert, serverCert: server.cert, serverKey: server.key,
      clientDir, rogueCert: rogue.cert, rogueKey: rogue.key,
    };
  } catch (err) {
    await dir.cleanup();
    throw err;
  }
}

/** listen.credentials naming the PSK file, and the certificates when `certs`. */
function credentialsOf(pki: Pki, certs: boolean): { pskFile: string; certFile: string; keyFile: string; caFile: string } {
  return {
    pskFile: pki.pskFile,
    certFile: certs ? pki.serverCert : '', keyFile: certs ? pki.serverKey : '', caFile: certs ? pki.ca : '',
  };
}

// ---- in-process server ---------------------------------------------------------------------------

interface LunDef { name: string; allowedNetworks?: string[] }

class InProcess {
  private constructor(readonly server: NbdServer, readonly port: number, private readonly luns: Lun[], private readonly dir: TmpDir) {}

  static async start(tlsMode: HostTls['mode'], pki: Pki, defs: LunDef[]): Promise<InProcess> {
    const dir = await tmpDir('nbd-starttls-');
    const registry = new LunRegistry();
    const luns: Lun[] = [];
    for (const d of defs) {
      const file = await sparseFile(dir.join(`${d.name}.img`), LUN_SIZE);
      const lun = new Lun({
        name: d.name, path: file, role: 'primary', mirror: 'none', readOnly: false, description: '', allowedNetworks: d.allowedNetworks,
      }, await Backing.open(file, false));
      registry.add(lun);
      luns.push(lun);
    }
    const listen = { host: '127.0.0.1', port: 0, tls: tlsMode, credentials: credentialsOf(pki, true) } as SiteConfig['listen'];
    const server = new NbdServer(registry, silentLogger(), { mode: tlsMode, credentials: loadHostCredentials(listen) });
    const { port } = await server.listen('127.0.0.1', 0);
    return new InProcess(server, port, luns, dir);
  }

  async stop(): Promise<void> {
    await this.server.shutdown(1000);
    for (const lun of this.luns) await lun.close();
    await this.dir.cleanup();
  }
}

/** Greeting read, client flags sent: ready for options. */
async function plainClient(port: number): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect('127.0.0.1', port);
  await c.readGreeting();
  await c.write(u32(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
  return c;
}

/** STARTTLS on a plain client, then Node's TLS client on the same socket. */
async function startTls(c: RawNbdClient, options: tls.ConnectionOptions): Promise<tls.TLSSocket> {
  await c.sendOption(OPT.STARTTLS);
  const r = await c.readOptionReply();
  expect([r.option, r.type], 'STARTTLS reply').to.deep.equal([OPT.STARTTLS, REP.ACK]);
  return new Promise((resolve, reject) => {
    // The certificate names the site's address, but what matters here is the chain and the key.
    const s = tls.connect({ socket: c.socket, checkServerIdentity: () => undefined, ...options });
    s.once('secureConnect', () => resolve(s));
    s.once('error', reject);
  });
}

function pskOptions(key: Buffer): tls.ConnectionOptions {
  return { pskCallback: () => ({ identity: IDENTITY, psk: key }), ciphers: 'TLS_AES_128_GCM_SHA256', minVersion: 'TLSv1.3' };
}

/** Resolves when the socket is closed; fails the test after WAIT_MS. */
function closed(socket: net.Socket): Promise<void> {
  if (socket.destroyed) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`connection still open after ${WAIT_MS} ms`)), WAIT_MS);
    socket.once('close', () => { clearTimeout(timer); resolve(); });
  });
}

function last<T>(a: T[]): T {
  return a[a.length - 1];
}

async function rejects(p: Promise<unknown>): Promise<boolean> {
  return p.then(() => false, () => true);
}

describe('NBD STARTTLS and allowedNetworks (in-process server)', function () {
  this.timeout(30_000);
  let pki: Pki;
  const cleanup = new Cleanup();
  const clients: net.Socket[] = [];
  const track = <T extends { socket: net.Socket }>(c: T): T => { clients.push(c.socket); return c; };

  before(async function () {
    pki = await makePki();
    cleanup.add('remove the PKI', () => pki.dir.cleanup());
  });
  afterEach(function () {
    for (const s of clients.splice(0)) s.destroy();
  });
  after(() => cleanup.run());

  describe('listen.tls "require"', function () {
    let srv: InProcess;
    before(async function () {
      srv = await InProcess.start('require', pki, [{ name: 'lun0' }]);
    });
    after(async function () { await srv?.stop(); });

    it('answers NBD_OPT_GO (and LIST, INFO, STRUCTURED_REPLY) before STARTTLS with NBD_REP_ERR_TLS_REQD, then ABORT with ACK', async function () {
      const c = track(await plainClient(srv.port));
      for (const [option, data] of [[OPT.GO, infoPayload('lun0')], [OPT.LIST, Buffer.alloc(0)], [OPT.INFO, infoPayload('lun0')], [OPT.STRUCTURED_REPLY, Buffer.alloc(0)]] as const) {
        await c.sendOption(option, data);
        const r = await c.readOptionReply();
        expect(r.option).to.equal(option);
        expect(r.type, `reply to option ${option}`).to.equal(REP.ERR_TLS_REQD);
      }
      await c.sendOption(OPT.ABORT);
      expect((await c.readOptionReply()).type).to.equal(REP.ACK);
    });

    it('closes on NBD_OPT_EXPORT_NAME before STARTTLS (it cannot be answered with an error)', async function () {
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.EXPORT_NAME, Buffer.from('lun0'));
      expect(await c.waitClosed(WAIT_MS)).to.equal(true);
      expect(await rejects(c.read(1, 'reading after EXPORT_NAME', 100)), 'bytes after EXPORT_NAME').to.equal(true);
    });

    it('refuses STARTTLS with data (ERR_INVALID), upgrades on a plain STARTTLS, refuses a second one, and serves I/O over TLS', async function () {
      const before = srv.server.tlsStats;
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.STARTTLS, Buffer.from('x'));
      expect((await c.readOptionReply()).type).to.equal(REP.ERR_INVALID);
      const secure = await startTls(c, pskOptions(pki.key));
      clients.push(secure);
      const t = new NbdTestClient(secure);
      expect((await t.option(OPT.STARTTLS))[0].type, 'STARTTLS over TLS').to.equal(REP.ERR_INVALID);
      expect(srv.server.tlsStats.established).to.equal(before.established + 1);
      expect(last(await t.option(OPT.GO, infoPayload('lun0'))).type).to.equal(REP.ACK);
      const data = randomBytes(256 * 1024);   // many TLS records each way
      expect((await t.roundTrip({ type: CMD.WRITE, cookie: 1n, offset: 4096, length: data.length }, data)).error).to.equal(0);
      const r = await t.roundTrip({ type: CMD.READ, cookie: 2n, offset: 4096, length: data.length });
      expect(r.error).to.equal(0);
      expect(r.data!.equals(data)).to.equal(true);
    });

    it('refuses a wrong pre-shared key in the TLS handshake, and counts it', async function () {
      const before = srv.server.tlsStats;
      const c = track(await plainClient(srv.port));
      expect(await rejects(startTls(c, pskOptions(randomBytes(32)))), 'TLS with a wrong key').to.equal(true);
      await closed(c.socket);
      expect(srv.server.tlsStats.failed).to.equal(before.failed + 1);
      expect(srv.server.tlsStats.established).to.equal(before.established);
    });

    it('accepts a client certificate from the configured CA, and refuses (and counts) one from another CA', async function () {
      const good = track(await plainClient(srv.port));
      const secure = await startTls(good, {
        ca: await fs.readFile(pki.ca), cert: await fs.readFile(`${pki.clientDir}/client-cert.pem`),
        key: await fs.readFile(`${pki.clientDir}/client-key.pem`),
      });
      clients.push(secure);
      expect(last(await new NbdTestClient(secure).option(OPT.INFO, infoPayload('lun0'))).type).to.equal(REP.ACK);

      const before = srv.server.tlsStats;
      const bad = track(await plainClient(srv.port));
      // A TLS 1.3 client may finish its side before the server has judged its certificate.
      const rogue = await startTls(bad, { ca: await fs.readFile(pki.ca), cert: await fs.readFile(pki.rogueCert), key: await fs.readFile(pki.rogueKey) })
        .catch(() => null);
      if (rogue) {
        clients.push(rogue);
        rogue.on('error', () => undefined);
        await closed(rogue);
      }
      await closed(bad.socket);
      expect(srv.server.tlsStats.failed).to.equal(before.failed + 1);
    });
  });

  describe('listen.tls "allow"', function () {
    let srv: InProcess;
    before(async function () {
      srv = await InProcess.start('allow', pki, [{ name: 'lun0' }]);
    });
    after(async function () { await srv?.stop(); });

    it('serves plain clients as before', async function () {
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.GO, infoPayload('lun0'));
      let r = await c.readOptionReply();
      while (r.type === REP.INFO) r = await c.readOptionReply();
      expect(r.type).to.equal(REP.ACK);
    });

    it('forgets STRUCTURED_REPLY negotiated before STARTTLS, as the spec asks', async function () {
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.STRUCTURED_REPLY);
      expect((await c.readOptionReply()).type).to.equal(REP.ACK);
      const secure = await startTls(c, pskOptions(pki.key));
      clients.push(secure);
      const t = new NbdTestClient(secure);
      const r = await t.option(OPT.SET_META_CONTEXT, metaPayload('lun0', ['base:allocation']));
      expect(last(r).type, 'SET_META_CONTEXT without structured replies').to.equal(REP.ERR_INVALID);
    });
  });

  it('listen.tls "off": STARTTLS is NBD_REP_ERR_UNSUP and negotiation goes on', async function () {
    const srv = await InProcess.start('off', pki, [{ name: 'lun0' }]);
    try {
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.STARTTLS);
      expect((await c.readOptionReply()).type).to.equal(REP.ERR_UNSUP);
      await c.sendOption(OPT.INFO, infoPayload('lun0'));
      expect((await c.readOptionReply()).type).to.equal(REP.INFO);
    } finally {
      for (const s of clients.splice(0)) s.destroy();
      await srv.stop();
    }
  });

  describe('allowedNetworks', function () {
    let srv: InProcess;
    before(async function () {
      srv = await InProcess.start('off', pki, [
        { name: 'far', allowedNetworks: ['10.0.0.0/8'] },
        { name: 'near', allowedNetworks: ['192.0.2.0/24', '127.0.0.0/8'] },
      ]);
    });
    after(async function () { await srv?.stop(); });

    async function replies(c: RawNbdClient, option: number, data: Buffer): Promise<{ type: number; data: Buffer }[]> {
      await c.sendOption(option, data);
      const out: { type: number; data: Buffer }[] = [];
      for (;;) {
        const r = await c.readOptionReply();
        out.push(r);
        if (r.type === REP.ACK || (r.type & 0x80000000) !== 0) return out;
      }
    }

    it('hides a LUN from LIST and answers INFO/GO/SET_META_CONTEXT for it as for a missing one', async function () {
      const c = track(await plainClient(srv.port));
      const list = await replies(c, OPT.LIST, Buffer.alloc(0));
      const names = list.filter((r) => r.type === REP.SERVER).map((r) => r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
      expect(names).to.deep.equal(['near']);
      const missing = last(await replies(c, OPT.INFO, infoPayload('nope')));
      for (const [option, data] of [[OPT.INFO, infoPayload('far')], [OPT.GO, infoPayload('far')], [OPT.INFO, infoPayload('')]] as const) {
        const r = await replies(c, option, data);
        expect(r, `option ${option}`).to.have.length(1);
        expect(r[0].type).to.equal(REP.ERR_UNKNOWN).and.to.equal(missing.type);
      }
      await c.sendOption(OPT.STRUCTURED_REPLY);
      await c.readOptionReply();
      expect(last(await replies(c, OPT.SET_META_CONTEXT, metaPayload('far', ['base:allocation']))).type).to.equal(REP.ERR_UNKNOWN);
      expect(last(await replies(c, OPT.GO, infoPayload('near'))).type).to.equal(REP.ACK);
    });

    it('closes on NBD_OPT_EXPORT_NAME of a hidden LUN', async function () {
      const c = track(await plainClient(srv.port));
      await c.sendOption(OPT.EXPORT_NAME, Buffer.from('far'));
      expect(await c.waitClosed(WAIT_MS)).to.equal(true);
    });
  });
});

// ---- real sites, real clients --------------------------------------------------------------------

interface NbdinfoJson { exports: { 'export-name': string; 'export-size': number }[] }

async function nbdinfo(...args: string[]): Promise<NbdinfoJson> {
  return JSON.parse((await exec('nbdinfo', ['--json', ...args], { timeoutMs: 30_000 })).stdout) as NbdinfoJson;
}

function pskUri(site: Site, exportName: string, pskFile: string): string {
  return `nbds://${IDENTITY}@${site.host}:${site.port}/${exportName}?tls-psk-file=${pskFile}`;
}

/** qemu-io over an NBD export with TLS credentials (`object`: a tls-creds-* object with id=tls0). */
async function qemuIo(site: Site, exportName: string, object: string, ...commands: string[]): Promise<string> {
  const args = ['--object', object, '--image-opts', `driver=nbd,host=${site.host},port=${site.port},export=${exportName},tls-creds=tls0`];
  for (const c of commands) args.push('-c', c);
  const r = await exec('qemu-io', args, { timeoutMs: 60_000 });
  expect(r.stdout + r.stderr, 'qemu-io').to.not.match(/fail|error/i);
  return r.stdout;
}

function logged(site: Site, message: string, extra: (entry: Record<string, unknown>) => boolean = () => true): Promise<Record<string, unknown>> {
  // The site's log arrives through a pipe: the one thing here with no event to wait on.
  return pollUntil(() => site.logs.map((l) => {
    try { return JSON.parse(l) as Record<string, unknown>; } catch { return null; }
  }).find((e) => e?.message === message && extra(e)) ?? null, { timeoutMs: 10_000, what: `log "${message}"` });
}

describe('NBD STARTTLS with real clients', function () {
  this.timeout(120_000);
  const cleanup = new Cleanup();
  let pki: Pki;
  let dir: TmpDir;
  let required: Site;
  let allowed: Site;
  let lun0: string;

  before(async function () {
    pki = await makePki();
    cleanup.add('remove the PKI', () => pki.dir.cleanup());
    dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    lun0 = await sparseFile(dir.join('lun0.img'), 64 * MiB);
    const far = await sparseFile(dir.join('far.img'), 8 * MiB);
    const luns = [
      { name: 'lun0', path: lun0, role: 'primary', mirror: 'none', allowedNetworks: ['127.0.0.0/8'] },
      { name: 'far', path: far, role: 'primary', mirror: 'none', allowedNetworks: ['10.0.0.0/8'] },
    ];
    required = await startSite({ listen: { tls: 'require', credentials: credentialsOf(pki, true) }, luns });
    cleanup.add('stop the "require" site', () => required.stop());
    const open = await sparseFile(dir.join('open.img'), 8 * MiB);
    const far2 = await sparseFile(dir.join('far2.img'), 8 * MiB);
    allowed = await startSite({
      listen: { tls: 'allow', credentials: credentialsOf(pki, false) },
      luns: [{ name: 'open', path: open, role: 'primary', mirror: 'none' }, { ...luns[1], path: far2 }],
    });
    cleanup.add('stop the "allow" site', () => allowed.stop());
  });
  after(() => cleanup.run());

  it('nbdinfo over TLS with a pre-shared key shows the export size', async function () {
    const info = await nbdinfo(pskUri(required, 'lun0', pki.pskFile));
    expect(info.exports[0]['export-size']).to.equal(64 * MiB);
  });

  it('nbdinfo over TLS with certificates (tls-certificates=DIR) shows the export size', async function () {
    const info = await nbdinfo(`nbds://${required.host}:${required.port}/lun0?tls-certificates=${pki.clientDir}`);
    expect(info.exports[0]['export-size']).to.equal(64 * MiB);
  });

  it('qemu-io writes and reads back over TLS, with a pre-shared key and with certificates', async function () {
    await qemuIo(required, 'lun0', `tls-creds-psk,id=tls0,endpoint=client,dir=${pki.qemuPskDir},username=${IDENTITY}`,
      'write -P 0xab 0 1M', 'read -P 0xab 0 1M');
    await qemuIo(required, 'lun0', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.clientDir}`,
      'write -P 0xcd 1M 2M', 'read -P 0xcd 1M 2M', 'read -P 0xab 0 1M');
    expect((await readAt(lun0, 0, MiB)).equals(Buffer.alloc(MiB, 0xab))).to.equal(true);
    expect((await readAt(lun0, MiB, 2 * MiB)).equals(Buffer.alloc(2 * MiB, 0xcd))).to.equal(true);
  });

  it('nbd-client lists the exports over TLS with certificates', async function () {
    const r = await exec('nbd-client', ['-l', required.host, String(required.port),
      '-certfile', `${pki.clientDir}/client-cert.pem`, '-keyfile', `${pki.clientDir}/client-key.pem`, '-cacertfile', pki.ca], { timeoutMs: 30_000 });
    expect(r.stdout.split('\n').map((l) => l.trim())).to.include('lun0').and.not.include('far');
  });

  it('under "require", plain clients are refused and told TLS is required', async function () {
    const info = await execNoThrow('nbdinfo', [`nbd://${required.host}:${required.port}/lun0`], { env: { ...process.env, LIBNBD_DEBUG: '1' }, timeoutMs: 30_000 });
    expect(info.code).to.not.equal(0);
    expect(info.stderr, 'the server\'s error message').to.include('TLS is required');
    // libnbd outside nbdinfo's option mode, and qemu, say it in their own words.
    const copy = await execNoThrow('nbdcopy', [`nbd://${required.host}:${required.port}/lun0`, 'null:'], { timeoutMs: 30_000 });
    expect(copy.code).to.not.equal(0);
    expect(copy.stderr).to.match(/server requires TLS/);
    const img = await execNoThrow('qemu-img', ['info', `nbd://${required.host}:${required.port}/lun0`], { timeoutMs: 30_000 });
    expect(img.code).to.not.equal(0);
    expect(img.stderr).to.match(/TLS/);
  });

  it('a wrong pre-shared key is refused, logged and counted', async function () {
    const r = await execNoThrow('nbdinfo', [pskUri(required, 'lun0', pki.wrongPskFile)], { timeoutMs: 30_000 });
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/TLS|gnutls/i);
    const entry = await logged(required, 'host refused: TLS handshake failed', (e) => /binder/.test(String(e.reason)));
    expect(entry.level).to.equal('warn');
  });

  it('allowedNetworks: a LUN for 10.0.0.0/8 is neither listed nor opened from 127.0.0.1; one for 127.0.0.0/8 is', async function () {
    const list = await nbdinfo('--list', pskUri(required, '', pki.pskFile));
    expect(list.exports.map((e) => e['export-name'])).to.deep.equal(['lun0']);
    const far = await execNoThrow('nbdinfo', [pskUri(required, 'far', pki.pskFile)], { timeoutMs: 30_000 });
    expect(far.code).to.not.equal(0);
    // The same as for an export that does not exist.
    const missing = await execNoThrow('nbdinfo', [pskUri(required, 'nope', pki.pskFile)], { timeoutMs: 30_000 });
    expect(far.stderr.replace(/far/g, 'NAME')).to.equal(missing.stderr.replace(/nope/g, 'NAME'));
    await logged(required, 'export hidden from host: address not in allowedNetworks', (e) => e.lun === 'far');
    expect((await nbdinfo(pskUri(required, 'lun0', pki.pskFile))).exports[0]['export-size']).to.equal(64 * MiB);
  });

  it('under "allow", plain clients work as before, TLS clients too, and allowedNetworks still applies', async function () {
    const plain = await nbdinfo(`nbd://${allowed.host}:${allowed.port}/open`);
    expect(plain.exports[0]['export-size']).to.equal(8 * MiB);
    const secure = await nbdinfo(pskUri(allowed, 'open', pki.pskFile));
    expect(secure.exports[0]['export-size']).to.equal(8 * MiB);
    const list = await nbdinfo('--list', `nbd://${allowed.host}:${allowed.port}`);
    expect(list.exports.map((e) => e['export-name'])).to.deep.equal(['open']);
    const far = await execNoThrow('nbdinfo', [`nbd://${allowed.host}:${allowed.port}/far`], { timeoutMs: 30_000 });
    expect(far.code).to.not.equal(0);
  });
});
