// The CLI as users run it (`node dist/cli.js ...`): exit codes and messages for usage and
// configuration errors. Needs dist/ (npm test builds it in pretest).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { freePort } from './helpers/ports.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');

interface Run { code: number | null; signal: string | null; stdout: string; stderr: string; ms: number }

/** Run the CLI with an environment free of NBD_MIRROR_* overrides. */
function cli(args: string[], timeoutMs = 10_000): Promise<Run> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NBD_MIRROR_')) env[k] = v;
  const started = Date.now();
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env, timeout: timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' },
      (err, stdout, stderr) => {
        const e = err as (Error & { code?: number | string; signal?: string }) | null;
        resolve({
          code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
          signal: e?.signal ?? null,
          stdout, stderr, ms: Date.now() - started,
        });
      });
  });
}

function lines(s: string): string[] {
  return s.split('\n').filter((l) => l.length > 0);
}

/** A port nothing listens on (free a moment ago). */
const closedPort = (): Promise<number> => freePort();

describe('cli', function () {
  let dir: string;
  let good: string;
  let image: string;

  const write = (name: string, value: unknown): string => {
    const file = path.join(dir, name);
    fs.writeFileSync(file, typeof value === 'string' ? value : JSON.stringify(value, null, 2));
    return file;
  };

  before(function () {
    expect(fs.existsSync(CLI), `${CLI} missing: run npm run build`).to.equal(true);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-cli-'));
    image = path.join(dir, 'lun0.img');
    fs.writeFileSync(image, Buffer.alloc(64 * 1024));
    good = write('good.json', {
      site: 'a', listen: { port: 0 }, admin: { port: 0 }, dataDir: path.join(dir, 'data'),
      luns: [{ name: 'lun0', path: image }],
    });
  });
  after(function () { fs.rmSync(dir, { recursive: true, force: true }); });

  it('config check GOOD: exit 0, prints ok', async function () {
    const r = await cli(['config', 'check', good]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.trim()).to.match(/ok$/);
    expect(r.stdout).to.include(good);
    expect(r.stderr).to.equal('');
  });

  const bad: Array<[string, () => unknown, string]> = [
    ['an unknown top-level key', () => ({ site: 'a', luns: [{ name: 'lun0', path: image }], colour: 'red' }), 'colour'],
    ['port 70000', () => ({ site: 'a', listen: { port: 70000 }, luns: [] }), 'listen.port'],
    ['a missing LUN path', () => ({ site: 'a', luns: [{ name: 'lun0', path: path.join(dir, 'nope.img') }] }), 'luns[0].path'],
    ['duplicate LUN names', () => ({ site: 'a', luns: [{ name: 'x', path: image }, { name: 'x', path: image }] }), 'luns[1].name'],
    ['malformed JSON', () => '{"site": ', 'malformed JSON'],
  ];
  bad.forEach(([label, value, key], n) => {
    it(`config check with ${label}: exit 2 and one stderr line naming ${key}`, async function () {
      const file = write(`bad-${n}.json`, value());
      const r = await cli(['config', 'check', file]);
      expect(r.code).to.equal(2);
      expect(lines(r.stderr), r.stderr).to.have.length(1);
      expect(r.stderr).to.include(key);
      expect(r.stderr).to.include(file);
      expect(r.stdout).to.equal('');
    });
  });

  it('config check of a missing file: exit 2, one line saying it cannot be read', async function () {
    const r = await cli(['config', 'check', path.join(dir, 'missing.json')]);
    expect(r.code).to.equal(2);
    expect(lines(r.stderr)).to.have.length(1);
    expect(r.stderr).to.match(/missing\.json: cannot read: ENOENT/);
  });

  it('serve --config BAD: exit 2 within 1 s, one stderr line naming the key', async function () {
    const file = write('serve-bad.json', { site: 'a', listen: { port: 70000 }, luns: [] });
    const r = await cli(['serve', '--config', file], 5000);
    expect(r.code).to.equal(2);
    expect(r.ms, 'exit time (ms)').to.be.below(1000);
    expect(lines(r.stderr)).to.have.length(1);
    expect(r.stderr).to.include('listen.port');
  });

  it('serve without --config: exit 2 with usage', async function () {
    const r = await cli(['serve']);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.include('--config');
  });

  it('serve with an unknown option: exit 2', async function () {
    const r = await cli(['serve', '--bogus']);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.include('bogus');
  });

  it('an unknown command: exit 2 naming it', async function () {
    const r = await cli(['frobnicate']);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.include('unknown command "frobnicate"');
  });

  it('no command: exit 2 with the usage on stdout', async function () {
    const r = await cli([]);
    expect(r.code).to.equal(2);
    expect(r.stdout).to.include('Usage');
  });

  for (const args of [['--help'], ['-h'], ['help'], ['serve', '--help'], ['status', '--help'], ['config', '--help']]) {
    it(`${args.join(' ')}: exit 0 with usage on stdout`, async function () {
      const r = await cli(args);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.include('Usage');
      expect(r.stderr).to.equal('');
    });
  }

  it('config without check, or check without a file: exit 2', async function () {
    expect((await cli(['config'])).code).to.equal(2);
    expect((await cli(['config', 'check'])).code).to.equal(2);
    expect((await cli(['config', 'lint', good])).code).to.equal(2);
  });

  it('status against a site that is not running: exit 3', async function () {
    const port = await closedPort();
    const file = write('status.json', { site: 'a', admin: { port }, luns: [{ name: 'lun0', path: image }] });
    const r = await cli(['status', '--config', file]);
    expect(r.code).to.equal(3);
    expect(r.stderr).to.include('not reachable');
  });
});
