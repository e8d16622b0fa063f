// parseConfig / loadConfig: defaults, environment overrides, and one-line errors naming the key.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { ConfigError, loadConfig, parseConfig } from '../../src/config/load.js';

const ORIGIN = 'site.json';

describe('config: parseConfig', function () {
  let dir: string;
  let image: string;
  let image2: string;

  before(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-config-'));
    image = path.join(dir, 'lun0.img');
    image2 = path.join(dir, 'lun1.img');
    fs.writeFileSync(image, Buffer.alloc(4096));
    fs.writeFileSync(image2, Buffer.alloc(4096));
  });
  after(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  const minimal = () => ({ site: 'a', luns: [{ name: 'lun0', path: image }] });
  const parse = (value: unknown, env: NodeJS.ProcessEnv = {}) =>
    parseConfig(typeof value === 'string' ? value : JSON.stringify(value), ORIGIN, env);

  /** The ConfigError a config raises; asserts it is one line that starts with the origin. */
  function configError(value: unknown, env: NodeJS.ProcessEnv = {}): string {
    let caught: unknown;
    try {
      parse(value, env);
    } catch (err) {
      caught = err;
    }
    expect(caught, 'a ConfigError').to.be.instanceOf(ConfigError);
    const msg = (caught as Error).message;
    expect(msg, 'one line').to.not.include('\n');
    expect(msg.startsWith(`${ORIGIN}: `), `starts with the origin: ${msg}`).to.equal(true);
    return msg;
  }

  it('gives a minimal config the documented defaults', function () {
    const cfg = parse(minimal());
    expect(cfg.site).to.equal('a');
    expect(cfg.listen).to.deep.equal({
      host: '127.0.0.1', port: 10809, tls: 'off', credentials: { pskFile: '', certFile: '', keyFile: '', caFile: '' },
    });
    expect(cfg.admin).to.deep.equal({ host: '127.0.0.1', port: 10811, socket: '', tokenFile: '' });
    expect(cfg.log.level).to.equal('info');
    expect(cfg.log.format).to.equal('auto');
    expect(cfg.shutdownTimeoutMs).to.equal(10000);
    expect(cfg.mirror, 'no mirror section: the site runs alone').to.equal(null);
    expect(cfg.luns).to.deep.equal([
      { name: 'lun0', path: image, role: 'primary', mirror: 'none', readOnly: false, description: '', allowedNetworks: [] },
    ]);
  });

  it('keeps explicit values', function () {
    const cfg = parse({
      site: 'east-1', listen: { host: '0.0.0.0', port: 0 }, admin: { port: 9000 }, log: { level: 'debug', format: 'json' },
      mirror: { peer: { host: '192.0.2.7', site: 'west-1' }, tls: 'off' },
      luns: [
        { name: 'lun0', path: image, role: 'primary', mirror: 'sync', description: 'db' },
        { name: 'lun1', path: image2, role: 'secondary', readOnly: true },
      ],
    });
    expect([cfg.listen.host, cfg.listen.port]).to.deep.equal(['0.0.0.0', 0]);
    expect(cfg.admin.port).to.equal(9000);
    expect(cfg.log).to.deep.equal({ level: 'debug', format: 'json' });
    expect(cfg.mirror?.peer.host).to.equal('192.0.2.7');
    expect(cfg.luns.map((l) => [l.name, l.role, l.mirror, l.readOnly, l.description])).to.deep.equal([
      ['lun0', 'primary', 'sync', false, 'db'],
      ['lun1', 'secondary', 'none', true, ''],
    ]);
  });

  it('takes environment overrides from the env argument (not process.env)', function () {
    const cfg = parse(minimal(), { NBD_MIRROR_LISTEN_PORT: '12345', NBD_MIRROR_LOG_LEVEL: 'warn' });
    expect(cfg.listen.port).to.equal(12345);
    expect(cfg.log.level).to.equal('warn');
    expect(parse(minimal()).listen.port, 'without the override').to.equal(10809);
  });

  it('an environment override wins over the file', function () {
    const cfg = parse({ ...minimal(), listen: { port: 2000 } }, { NBD_MIRROR_LISTEN_PORT: '12345' });
    expect(cfg.listen.port).to.equal(12345);
  });

  it('a bad environment override is an error naming the key', function () {
    expect(configError(minimal(), { NBD_MIRROR_LISTEN_PORT: '99999' })).to.include('listen.port');
  });

  it('malformed JSON', function () {
    const msg = configError('{"site": "a",');
    expect(msg).to.include('malformed JSON');
  });

  it('a JSON value that is not an object', function () {
    for (const text of ['[]', 'null', '"x"', '3']) {
      expect(configError(text), text).to.include('must be a JSON object');
    }
  });

  it('an unknown top-level key', function () {
    const msg = configError({ ...minimal(), bogus: 1 });
    expect(msg).to.include('bogus');
    expect(msg).to.include('unknown key');
  });

  it('an unknown nested key', function () {
    expect(configError({ ...minimal(), listen: { port: 1, hots: 'x' } })).to.include('listen.hots');
  });

  // Each LUN-level schema error: [label, config, index, key]. Checked twice: that the message
  // carries the index and the key at all, and (the test after the loop) that it spells them as
  // one path luns[i].key like every other LUN message does.
  const lunCases = (): Array<[string, unknown, number, string]> => [
    ['an unknown key inside a LUN', { site: 'a', luns: [{ name: 'lun0', path: image, colour: 'red' }] }, 0, 'colour'],
    ['an unknown key inside the second LUN', { site: 'a', luns: [{ name: 'lun0', path: image }, { name: 'lun1', path: image2, size: 5 }] }, 1, 'size'],
    ['a missing path', { site: 'a', luns: [{ name: 'lun0' }] }, 0, 'path'],
    ['an unknown role', { site: 'a', luns: [{ name: 'lun0', path: image, role: 'tertiary' }] }, 0, 'role'],
    ['an unknown mirror mode', { site: 'a', luns: [{ name: 'lun0', path: image, mirror: 'semi' }] }, 0, 'mirror'],
    ...['-bad', 'a b', '', 'x'.repeat(129), 'é'].map((name): [string, unknown, number, string] =>
      [`a bad LUN name ${JSON.stringify(name.length > 20 ? `${name.slice(0, 5)}…(${name.length})` : name)}`,
        { site: 'a', luns: [{ name, path: image }] }, 0, 'name']),
  ];

  // Labels now; the configs are built inside the tests, once before() has made the images.
  lunCases().forEach(([label, , i, key], n) => {
    it(`${label}: one line naming luns, [${i}] and ${key}`, function () {
      const msg = configError(lunCases()[n][1]);
      expect(msg).to.match(/\bluns\b/);
      expect(msg).to.include(`[${i}]`);
      expect(msg).to.include(key);
    });
  });

  it('LUN schema errors spell the key luns[i].key, as the other LUN errors do', function () {
    const wrong: string[] = [];
    for (const [label, value, i, key] of lunCases()) {
      const msg = configError(value);
      if (!msg.includes(`luns[${i}].${key}`)) wrong.push(`${label}: ${msg}`);
    }
    expect(wrong, 'messages not naming luns[i].key').to.deep.equal([]);
  });

  it('a LUN that is not an object names luns and [0]', function () {
    expect(configError({ site: 'a', luns: [3] })).to.match(/luns.*\[0\]/);
  });

  it('a path that does not exist names luns[0].path', function () {
    const missing = path.join(dir, 'nope.img');
    const msg = configError({ site: 'a', luns: [{ name: 'lun0', path: missing }] });
    expect(msg).to.include('luns[0].path');
    expect(msg).to.include(missing);
    expect(msg).to.include('does not exist');
  });

  it('a path that is a directory names luns[0].path', function () {
    expect(configError({ site: 'a', luns: [{ name: 'lun0', path: dir }] })).to.include('luns[0].path');
  });

  it('duplicate LUN names', function () {
    const msg = configError({ site: 'a', luns: [{ name: 'lun0', path: image }, { name: 'lun0', path: image2 }] });
    expect(msg).to.include('luns[1].name');
    expect(msg).to.include('duplicate');
  });

  it('port 70000', function () {
    expect(configError({ ...minimal(), listen: { port: 70000 } })).to.include('listen.port');
    expect(configError({ ...minimal(), admin: { port: 70000 } })).to.include('admin.port');
  });

  it('a secondary with mirror sync names luns[0].mirror', function () {
    expect(configError({ site: 'a', mirror: { tls: 'off' }, luns: [{ name: 'lun0', path: image, role: 'secondary', mirror: 'sync' }] }))
      .to.include('luns[0].mirror');
  });

  it('a mirrored LUN without a "mirror" section names luns[0]', function () {
    expect(configError({ site: 'a', luns: [{ name: 'lun0', path: image, mirror: 'sync' }] })).to.include('luns[0]');
  });

  it('luns that is not an array names luns', function () {
    expect(configError({ site: 'a', luns: 'lun0' })).to.match(/\bluns\b/);
  });

  it('luns given as a single object (not an array) is refused', function () {
    expect(configError({ site: 'a', luns: { name: 'lun0', path: image } })).to.match(/\bluns\b/);
  });

  it('a missing site name names site', function () {
    expect(configError({ luns: [] })).to.match(/\bsite\b/);
  });

  it('an invalid log level names log.level', function () {
    expect(configError({ ...minimal(), log: { level: 'loud' } })).to.include('log.level');
  });

  it('a long offending value is cut, keeping the message short', function () {
    const msg = configError({ ...minimal(), log: { level: 'x'.repeat(5000) } });
    expect(msg.length).to.be.below(400);
  });
});

describe('config: loadConfig', function () {
  let dir: string;
  before(function () { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-config-')); });
  after(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  it('reads and validates a file, naming it in errors', function () {
    const image = path.join(dir, 'x.img');
    fs.writeFileSync(image, Buffer.alloc(512));
    const good = path.join(dir, 'good.json');
    fs.writeFileSync(good, JSON.stringify({ site: 'a', luns: [{ name: 'x', path: image }] }));
    const saved = process.env.NBD_MIRROR_LISTEN_PORT;
    delete process.env.NBD_MIRROR_LISTEN_PORT;
    try {
      expect(loadConfig(good).luns[0].name).to.equal('x');
    } finally {
      if (saved !== undefined) process.env.NBD_MIRROR_LISTEN_PORT = saved;
    }
    const bad = path.join(dir, 'bad.json');
    fs.writeFileSync(bad, JSON.stringify({ site: 'a', nope: true, luns: [] }));
    expect(() => loadConfig(bad)).to.throw(ConfigError, new RegExp(`^${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: .*nope`));
  });

  it('a missing file is a ConfigError naming the file', function () {
    const missing = path.join(dir, 'missing.json');
    expect(() => loadConfig(missing)).to.throw(ConfigError, /missing\.json: cannot read: ENOENT/);
  });
});

describe('config: strict types, suggestions and cross-key checks', function () {
  let dir: string;
  let image: string;
  let image2: string;
  before(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-config-x-'));
    image = path.join(dir, 'lun0.img');
    image2 = path.join(dir, 'lun1.img');
    fs.writeFileSync(image, Buffer.alloc(4096));
    fs.writeFileSync(image2, Buffer.alloc(4096));
  });
  after(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  function configError(value: unknown, env: NodeJS.ProcessEnv = {}): string {
    try {
      parseConfig(JSON.stringify(value), ORIGIN, env);
    } catch (err) {
      expect(err).to.be.instanceOf(ConfigError);
      const msg = (err as Error).message;
      expect(msg, 'one line').to.not.include('\n');
      return msg;
    }
    throw new Error(`accepted: ${JSON.stringify(value)}`);
  }
  const lun = (extra: Record<string, unknown> = {}) => ({ name: 'lun0', path: image, ...extra });

  it('"readOnly": "no" is refused, saying a boolean was expected (no string→boolean coercion)', function () {
    for (const v of ['no', 'false', 'true', 0, 1]) {
      const msg = configError({ site: 'a', luns: [lun({ readOnly: v })] });
      expect(msg).to.include('luns[0].readOnly');
      expect(msg).to.include('must be a boolean');
      expect(msg).to.include(typeof v === 'string' ? `the string "${v}"` : `the number ${v}`);
    }
    expect(parseConfig(JSON.stringify({ site: 'a', luns: [lun({ readOnly: true })] }), ORIGIN, {}).luns[0].readOnly).to.equal(true);
  });

  it('a port or count given as a string is refused (no string→number coercion)', function () {
    expect(configError({ site: 'a', luns: [], listen: { port: '10809' } })).to.match(/listen\.port: must be a number.*the string "10809"/);
    expect(configError({ site: 'a', luns: [], shutdownTimeoutMs: 1.5 })).to.match(/shutdownTimeoutMs: must be a number.*1\.5/);
    expect(configError({ site: 'a', luns: [], io: { fastPath: 'yes' } })).to.include('io.fastPath: must be a boolean');
    expect(configError({ site: 'a', luns: [], site2: 1, listen: 5 })).to.include('listen: must be an object');
  });

  it('environment overrides are still strings converted by the schema', function () {
    const cfg = parseConfig(JSON.stringify({ site: 'a', luns: [] }), ORIGIN, { NBD_MIRROR_LISTEN_PORT: '12345', NBD_MIRROR_IO_FAST_PATH: 'false' });
    expect(cfg.listen.port).to.equal(12345);
    expect(cfg.io.fastPath).to.equal(false);
  });

  it('an unknown key is answered with the nearest known key', function () {
    expect(configError({ site: 'a', luns: [lun({ readonly: true })] })).to.include('luns[0].readonly: unknown key (did you mean "luns[0].readOnly"?)');
    expect(configError({ site: 'a', luns: [], listen: { prot: 1 } })).to.include('listen.prot: unknown key (did you mean "listen.port"?)');
    expect(configError({ site: 'a', luns: [], dataDri: '/x' })).to.include('did you mean "dataDir"?');
    const far = configError({ site: 'a', luns: [], zzzzzzzz: 1 });
    expect(far).to.include('zzzzzzzz: unknown key');
    expect(far).to.not.include('did you mean');
  });

  it('duplicate ports between listen, mirror.listen and admin, same host or a wildcard', function () {
    const mirror = (listen: Record<string, unknown>) => ({ tls: 'off', listen, peer: { host: '192.0.2.20', port: 10810 } });
    let msg = configError({ site: 'a', luns: [], listen: { port: 7000 }, admin: { port: 7000 } });
    expect(msg).to.include('listen.port and admin.port');
    msg = configError({ site: 'a', luns: [], listen: { host: '0.0.0.0', port: 7001 }, mirror: mirror({ host: '127.0.0.1', port: 7001 }) });
    expect(msg).to.include('listen.port and mirror.listen.port');
    msg = configError({ site: 'a', luns: [], admin: { port: 7002 }, mirror: mirror({ host: '127.0.0.1', port: 7002 }) });
    expect(msg).to.include('admin.port and mirror.listen.port');
    // Different specific addresses, or port 0 (a free one each), do not clash.
    expect(() => parseConfig(JSON.stringify({ site: 'a', luns: [], listen: { host: '127.0.0.2', port: 7003 }, admin: { host: '127.0.0.1', port: 7003 } }), ORIGIN, {})).to.not.throw();
    expect(() => parseConfig(JSON.stringify({ site: 'a', luns: [], listen: { port: 0 }, admin: { port: 0 } }), ORIGIN, {})).to.not.throw();
  });

  it('two LUNs on one backing file (same realpath)', function () {
    const link = path.join(dir, 'alias.img');
    fs.rmSync(link, { force: true });
    fs.symlinkSync(image, link);
    const msg = configError({ site: 'a', luns: [lun(), { name: 'lun1', path: link }] });
    expect(msg).to.include('luns[0].path and luns[1].path');
    expect(configError({ site: 'a', luns: [lun(), { name: 'lun1', path: path.join(dir, '.', 'lun0.img') }] })).to.include('luns[0].path and luns[1].path');
    expect(() => parseConfig(JSON.stringify({ site: 'a', luns: [lun(), { name: 'lun1', path: image2 }] }), ORIGIN, {})).to.not.throw();
  });

  it('a peer that is this site\'s own mirror listener', function () {
    const msg = configError({ site: 'a', luns: [], mirror: { tls: 'off', listen: { host: '127.0.0.1', port: 7010 }, peer: { host: '127.0.0.1', port: 7010 } } });
    expect(msg).to.include('mirror.peer.host and mirror.peer.port');
    expect(configError({ site: 'a', luns: [], mirror: { tls: 'off', listen: { host: '0.0.0.0', port: 7011 }, peer: { host: 'localhost', port: 7011 } } }))
      .to.include('own mirror listener');
    expect(() => parseConfig(JSON.stringify({ site: 'a', luns: [], mirror: { tls: 'off', listen: { port: 7012 }, peer: { host: '127.0.0.1', port: 7013 } } }), ORIGIN, {})).to.not.throw();
  });

  it('admin.tokenFile: a secret file (not readable by others) with a token of at least 16 characters', function () {
    const tok = path.join(dir, 'admin.token');
    fs.writeFileSync(tok, 'short\n', { mode: 0o600 });
    expect(configError({ site: 'a', luns: [], admin: { tokenFile: tok } })).to.match(/admin\.tokenFile: .*at least 16 characters/);
    fs.writeFileSync(tok, 'a-token-long-enough-1234\n');
    fs.chmodSync(tok, 0o644);
    expect(configError({ site: 'a', luns: [], admin: { tokenFile: tok } })).to.match(/admin\.tokenFile: .*readable by every user/);
    fs.chmodSync(tok, 0o600);
    expect(parseConfig(JSON.stringify({ site: 'a', luns: [], admin: { tokenFile: tok } }), ORIGIN, {}).admin.tokenFile).to.equal(tok);
  });

  it('admin.socket: a path too long for a unix socket is refused, naming the key', function () {
    expect(configError({ site: 'a', luns: [], dataDir: `/${'d'.repeat(120)}` })).to.match(/admin\.socket: .* at most 107/);
    expect(configError({ site: 'a', luns: [], admin: { socket: `/${'s'.repeat(120)}.sock` } })).to.include('admin.socket');
  });

  it('several problems are one line naming every key', function () {
    const msg = configError({ site: 'a', luns: [lun({ readOnly: 'no' })], listen: { port: '1' } });
    expect(msg).to.include('luns[0].readOnly');
    expect(msg).to.include('listen.port');
  });
});
