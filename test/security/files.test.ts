// Key files, certificates and dataDir: what a site refuses to start with, through the real
// config loader (so `nbd-mirror config check` reports the same), and the key file format.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { ConfigError, parseConfig } from '../../src/config/load.js';
import { prepareDataDir, SecurityError } from '../../src/security/files.js';
import { parsePsk } from '../../src/security/psk.js';

const KEY = 'ab'.repeat(32);

describe('security: key files and dataDir', function () {
  let dir: string;
  let image: string;
  beforeEach(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-sec-'));
    image = path.join(dir, 'lun0.img');
    fs.writeFileSync(image, Buffer.alloc(4096));
  });
  afterEach(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  const keyFile = (name: string, text: string, mode: number) => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, text);
    fs.chmodSync(file, mode);
    return file;
  };
  const mirrored = (mirror: Record<string, unknown>, extra: Record<string, unknown> = {}) => JSON.stringify({
    site: 'a', dataDir: path.join(dir, 'data'), mirror: { peer: { site: 'b', host: '127.0.0.2' }, ...mirror },
    luns: [{ name: 'lun0', path: image, mirror: 'sync' }], ...extra,
  });
  const error = (text: string): string => {
    try {
      parseConfig(text, 'site.json', {});
    } catch (err) {
      expect(err).to.be.instanceOf(ConfigError);
      return (err as Error).message;
    }
    throw new Error('expected a ConfigError');
  };

  it('the default mirror.tls is "psk" and needs a key file', function () {
    expect(error(mirrored({}))).to.include('mirror.credentials.pskFile: required when mirror.tls is "psk"');
    const cfg = parseConfig(mirrored({ credentials: { pskFile: keyFile('m.psk', `x:${KEY}\n`, 0o600) } }), 'site.json', {});
    expect(cfg.mirror!.tls).to.equal('psk');
  });

  it('refuses a key file other users can write or read', function () {
    expect(error(mirrored({ credentials: { pskFile: keyFile('ww.psk', `x:${KEY}\n`, 0o602) } }))).to.match(/world-writable/);
    expect(error(mirrored({ credentials: { pskFile: keyFile('wr.psk', `x:${KEY}\n`, 0o604) } }))).to.match(/readable by every user/);
    expect(error(mirrored({ credentials: { pskFile: path.join(dir, 'missing.psk') } }))).to.match(/does not exist/);
  });

  it('mirror.tls "cert" needs a certificate, a CA, and still the shared key (heartbeats)', function () {
    const cert = keyFile('c.pem', 'x', 0o644);
    const key = keyFile('k.pem', 'x', 0o600);
    expect(error(mirrored({ tls: 'cert' }))).to.include('certFile');
    expect(error(mirrored({ tls: 'cert', credentials: { certFile: cert, keyFile: key } }))).to.include('caFile');
    expect(error(mirrored({ tls: 'cert', credentials: { certFile: cert, keyFile: key, caFile: cert } }))).to.include('heartbeats');
    expect(error(mirrored({ tls: 'cert', credentials: { certFile: cert, caFile: cert, pskFile: keyFile('m.psk', `x:${KEY}\n`, 0o600) } })))
      .to.include('certFile and keyFile go together');
    expect(error(mirrored({ tls: 'cert', credentials: { certFile: keyFile('cw.pem', 'x', 0o646), keyFile: key, caFile: cert } })))
      .to.match(/world-writable/);
  });

  it('mirror.tls "off" needs no key; a mirror key file must hold exactly one key', function () {
    expect(parseConfig(mirrored({ tls: 'off' }), 'site.json', {}).mirror!.tls).to.equal('off');
    expect(error(mirrored({ credentials: { pskFile: keyFile('two.psk', `x:${KEY}\ny:${KEY}\n`, 0o600) } }))).to.include('exactly one key');
  });

  it('host TLS needs a key file or a certificate', function () {
    expect(error(JSON.stringify({ site: 'a', dataDir: path.join(dir, 'd'), listen: { tls: 'require' }, luns: [] }))).to.include('listen.credentials');
  });

  it('refuses a world-writable dataDir; a missing one is created 0700; an open one is tightened', function () {
    const data = path.join(dir, 'data');
    fs.mkdirSync(data);
    fs.chmodSync(data, 0o777);
    expect(error(mirrored({ tls: 'off' }))).to.match(/dataDir: .* is world-writable/);
    expect(() => prepareDataDir(data)).to.throw(SecurityError);
    fs.chmodSync(data, 0o755);
    expect(prepareDataDir(data)).to.equal(0o755);
    expect(fs.statSync(data).mode & 0o777).to.equal(0o700);
    const fresh = path.join(dir, 'fresh', 'state');
    expect(prepareDataDir(fresh)).to.equal(null);
    expect(fs.statSync(fresh).mode & 0o777).to.equal(0o700);
  });

  it('parses psktool files and rejects malformed or short keys, naming the line', function () {
    const f = parsePsk(`# comment\n\nalice:${KEY}\nbob:${'01'.repeat(16)}\n`, 'k.psk');
    expect([...f.keys.keys()]).to.deep.equal(['alice', 'bob']);
    expect(f.first.identity).to.equal('alice');
    expect(f.first.key.length).to.equal(32);
    const bad = (text: string) => { try { parsePsk(text, 'k.psk'); } catch (e) { return (e as Error).message; } return 'accepted'; };
    expect(bad('alice')).to.include('k.psk:1');
    expect(bad(`alice:${'01'.repeat(15)}`)).to.include('at least 16');
    expect(bad('alice:xyz0')).to.include('hexadecimal');
    expect(bad(`a b:${KEY}`)).to.include('identity');
    expect(bad(`a:${KEY}\na:${KEY}`)).to.include('twice');
    expect(bad('# nothing\n')).to.include('no "identity:hexkey"');
  });
});
