// Every CLI command as a user runs it (`node dist/cli.js ...`): output shape and exit code.
// `status` and `journal inspect` run against real sites (a mirrored pair, and a lone primary
// whose peer is a closed port). Needs dist/ (npm test builds it in pretest).
import { spawn, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { expect } from 'chai';
import { siteStatus, startPair, waitLunStates, type Pair } from './helpers/pair.js';
import { Cleanup, cliPath, exec, pollUntil, readAt, sparseFile, startSite, tmpDir, type Site } from './helpers/site.js';
import type { TmpDir } from './helpers/tmp.js';
import { freePort } from './helpers/ports.js';
import { duration, formatStatus } from '../src/admin/client.js';

const MiB = 1024 * 1024;
const SHORT_HEARTBEAT = { intervalMs: 200, timeoutMs: 600, probationMs: 1000 };

interface Run { code: number | null; signal: string | null; stdout: string; stderr: string }

/** The environment without NBD_MIRROR_* overrides (plus `extra`). */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NBD_MIRROR_')) env[k] = v;
  return { ...env, ...extra };
}

function cli(args: string[], opts: { timeoutMs?: number; env?: Record<string, string> } = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cliPath(), ...args], {
      env: cleanEnv(opts.env), timeout: opts.timeoutMs ?? 15_000, killSignal: 'SIGKILL', encoding: 'utf8', maxBuffer: 16 * MiB,
    }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string; signal?: string }) | null;
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : null) : 0, signal: e?.signal ?? null, stdout, stderr });
    });
  });
}

const lines = (s: string): string[] => s.split('\n').filter((l) => l.length > 0);
const why = (r: Run): string => `exit ${r.code}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;

/** A port nothing listens on (free a moment ago). */
const closedPort = (): Promise<number> => freePort();

async function sha256(file: string): Promise<string> {
  return createHash('sha256').update(await fs.readFile(file)).digest('hex');
}

/** The cells of a `status` table row (columns are separated by two or more spaces). */
const cells = (row: string): string[] => row.trim().split(/\s{2,}/);
const HEADER = ['LUN', 'ROLE', 'MODE', 'STATE', 'PROTECTION', 'PROGRESS', 'ETA', 'JOURNAL', 'LAG', 'SIZE', 'HOSTS', 'WRITES', 'WRITTEN', 'READS', 'REASON'];
/** The site line: "site a  (peer b, link up; rss 80.1 MiB, heap 12.0 MiB)". */
const SITE_LINE = (site: string, peer: string) => new RegExp(`^site ${site}  \\(peer ${peer}, link \\w+; rss \\d+\\.\\d MiB, heap \\d+\\.\\d MiB\\)$`);

/** qemu-io writes (each `[pattern, offset, length]`) in one qemu-io run. */
function qemuWrites(uri: string, writes: Array<[number, number, number]>) {
  const cmds = writes.flatMap(([p, off, len]) => ['-c', `write -P 0x${p.toString(16)} ${off} ${len}`]);
  return exec('qemu-io', ['-f', 'raw', ...cmds, uri], { timeoutMs: 30_000 });
}

interface JournalJson {
  path: string; exists: boolean; records: number; bytes: number; oldestAgeMs: number | null;
  minSeq: number | null; maxSeq: number | null; corrupt: null | { offset: number; reason: string };
  entries: Array<{ seq: number; dep: number; kind: string; offset: number; length: number; time: string }>;
}

/** Journal file layout (docs/journal-format.md): header = 20 fixed bytes + name + u32 crc; records = 52-byte header + data. */
function recordPositions(buf: Buffer, lunName: string): Array<{ pos: number; dataLen: number; seq: number }> {
  const headerLen = 20 + Buffer.byteLength(lunName) + 4;
  expect(buf.subarray(0, 8).toString('latin1')).to.equal('NBDMJRNL');
  const out: Array<{ pos: number; dataLen: number; seq: number }> = [];
  let pos = headerLen;
  while (pos + 52 <= buf.length) {
    expect(buf.readUInt32BE(pos), `record magic at ${pos}`).to.equal(0x4e4d4a31);
    const seq = buf.readUInt32BE(pos + 12);
    const dataLen = buf.readUInt32BE(pos + 36);
    out.push({ pos, dataLen, seq });
    pos += 52 + dataLen;
  }
  expect(pos, 'records end exactly at the end of the file').to.equal(buf.length);
  return out;
}

describe('cli commands', function () {
  this.timeout(60_000);

  describe('help and usage', function () {
    it('--help: exit 0 and lists every command', async function () {
      const r = await cli(['--help']);
      expect(r.code, why(r)).to.equal(0);
      expect(r.stderr).to.equal('');
      for (const cmd of ['serve --config', 'status --config', 'config check', 'config schema', 'journal inspect']) {
        expect(r.stdout, `--help mentions "${cmd}"`).to.include(`nbd-mirror ${cmd}`);
      }
      expect(r.stdout).to.match(/Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 site not reachable/);
    });

    for (const cmd of ['serve', 'status', 'config', 'journal']) {
      it(`${cmd} --help: exit 0 with that command's usage on stdout`, async function () {
        const r = await cli([cmd, '--help']);
        expect(r.code, why(r)).to.equal(0);
        expect(r.stderr).to.equal('');
        expect(r.stdout.startsWith(`Usage: nbd-mirror ${cmd}`), r.stdout).to.equal(true);
      });
    }

    it('an unknown command: exit 2, stderr names it, nothing on stdout', async function () {
      const r = await cli(['mirror-everything']);
      expect(r.code, why(r)).to.equal(2);
      expect(r.stderr).to.include('unknown command "mirror-everything"');
      expect(r.stdout).to.equal('');
    });

    it('journal without inspect/LUN/--config, or a LUN not in the config: exit 2; a LUN with no journal: exit 0', async function () {
      const dir = await tmpDir('nbd-cli-journal-');
      try {
        const img = await sparseFile(dir.join('lun0.img'), MiB);
        const cfg = dir.join('c.json');
        await fs.writeFile(cfg, JSON.stringify({ site: 'a', dataDir: dir.join('data'), luns: [{ name: 'lun0', path: img }] }));
        expect((await cli(['journal'])).code).to.equal(2);
        expect((await cli(['journal', 'inspect', 'lun0'])).code).to.equal(2);
        expect((await cli(['journal', 'inspect', '--config', cfg])).code).to.equal(2);
        const r = await cli(['journal', 'inspect', 'lun9', '--config', cfg]);
        expect(r.code, why(r)).to.equal(2);
        expect(r.stderr).to.include('no LUN "lun9"');
        // A LUN that never had a journal: exit 0, "no journal".
        const none = await cli(['journal', 'inspect', 'lun0', '--config', cfg]);
        expect(none.code, why(none)).to.equal(0);
        expect(none.stdout).to.equal(`${dir.join('data', 'lun0.journal')}: no journal (nothing waiting for the peer)\n`);
        const noneJson = JSON.parse((await cli(['journal', 'inspect', 'lun0', '--config', cfg, '--json'])).stdout) as JournalJson;
        expect([noneJson.exists, noneJson.records, noneJson.entries]).to.deep.equal([false, 0, []]);
      } finally {
        await dir.cleanup();
      }
    });
  });

  describe('config check and config schema', function () {
    let dir: TmpDir;
    let good: string;
    let bad: string;

    before(async function () {
      dir = await tmpDir('nbd-cli-config-');
      const img = await sparseFile(dir.join('lun0.img'), MiB);
      good = dir.join('good.json');
      await fs.writeFile(good, JSON.stringify({ site: 'a', dataDir: dir.join('data'), luns: [{ name: 'lun0', path: img }] }));
      bad = dir.join('bad.json');
      await fs.writeFile(bad, JSON.stringify({ site: 'a', luns: [{ name: 'lun0', path: img, mirror: 'sync' }] }));
    });
    after(async function () { await dir?.cleanup(); });

    it('config check GOOD: exit 0 and exactly "FILE: ok"', async function () {
      const r = await cli(['config', 'check', good]);
      expect(r.code, why(r)).to.equal(0);
      expect(r.stdout).to.equal(`${good}: ok\n`);
      expect(r.stderr).to.equal('');
    });

    it('config check BAD (mirror "sync" without a mirror section): exit 2, one stderr line naming the LUN', async function () {
      const r = await cli(['config', 'check', bad]);
      expect(r.code, why(r)).to.equal(2);
      expect(r.stdout).to.equal('');
      expect(lines(r.stderr), r.stderr).to.have.length(1);
      expect(r.stderr).to.include(bad);
      expect(r.stderr).to.include('luns[0]');
    });

    it('the env variable the schema documents for listen.port is honoured by config check', async function () {
      const r = await cli(['config', 'check', good], { env: { NBD_MIRROR_LISTEN_PORT: '70000' } });
      expect(r.code, why(r)).to.equal(2);
      expect(r.stderr).to.include('listen.port');
    });

    // key -> [default, env var or null]
    const EXPECTED: Record<string, [unknown, string | null]> = {
      site: ['', 'NBD_MIRROR_SITE'],
      'listen.port': [10809, 'NBD_MIRROR_LISTEN_PORT'],
      dataDir: ['/var/lib/nbd-mirror', 'NBD_MIRROR_DATA_DIR'],
      'admin.port': [10811, 'NBD_MIRROR_ADMIN_PORT'],
      luns: [[], null],
      'mirror.peer.host': ['127.0.0.1', 'NBD_MIRROR_PEER_HOST'],
      'mirror.heartbeat.intervalMs': [1500, null],
      'mirror.journal.maxBytes': [1024 * MiB, 'NBD_MIRROR_JOURNAL_MAX_BYTES'],
      'io.fastPath': [true, 'NBD_MIRROR_IO_FAST_PATH'],
      'log.level': ['info', 'NBD_MIRROR_LOG_LEVEL'],
    };

    it('config schema: exit 0, every key with its default and env variable, then its doc', async function () {
      const r = await cli(['config', 'schema']);
      expect(r.code, why(r)).to.equal(0);
      expect(r.stderr).to.equal('');
      const out = lines(r.stdout);
      for (const [key, [def, env]] of Object.entries(EXPECTED)) {
        const i = out.findIndex((l) => l.startsWith(`${key}  (`));
        expect(i, `a line for ${key} in:\n${r.stdout}`).to.be.at.least(0);
        const line = out[i];
        expect(line, key).to.include(`default ${JSON.stringify(def)}`);
        if (env) expect(line, key).to.include(`env ${env}`);
        else expect(line, key).to.not.include('env ');
        expect(out[i + 1], `the doc line after ${key}`).to.match(/^ {4}\S/);
      }
    });

    it('config schema --json: an array of {key, doc, default, env, format}, same keys as the text form', async function () {
      const [rj, rt] = await Promise.all([cli(['config', 'schema', '--json']), cli(['config', 'schema'])]);
      expect(rj.code, why(rj)).to.equal(0);
      const keys = JSON.parse(rj.stdout) as Array<Record<string, unknown>>;
      expect(keys).to.be.an('array').that.is.not.empty;
      for (const k of keys) {
        expect(Object.keys(k).sort(), JSON.stringify(k)).to.deep.equal(['default', 'doc', 'env', 'format', 'key']);
        expect(k.key).to.be.a('string');
        expect(k.doc, String(k.key)).to.be.a('string').that.is.not.empty;
        expect(k.format, String(k.key)).to.be.a('string').that.is.not.empty;
        expect(k.env === null || (typeof k.env === 'string' && /^NBD_MIRROR_[A-Z_]+$/.test(k.env)), `${k.key} env ${k.env}`).to.equal(true);
      }
      const names = keys.map((k) => k.key as string);
      expect(new Set(names).size, 'keys are unique').to.equal(names.length);
      const envs = keys.map((k) => k.env).filter((e) => e !== null);
      expect(new Set(envs).size, 'env variables are unique').to.equal(envs.length);
      for (const [key, [def, env]] of Object.entries(EXPECTED)) {
        const k = keys.find((x) => x.key === key);
        expect(k, `key ${key}`).to.not.equal(undefined);
        expect(k!.default, key).to.deep.equal(def);
        expect(k!.env, key).to.equal(env);
      }
      const textKeys = lines(rt.stdout).filter((l) => !l.startsWith(' ')).map((l) => l.split('  (')[0]);
      expect(textKeys).to.deep.equal(names);
    });
  });

  describe('status', function () {
    it('against a site that is not running: exit 3, one stderr line naming the site and the address', async function () {
      const dir = await tmpDir('nbd-cli-status-');
      try {
        const port = await closedPort();
        const img = await sparseFile(dir.join('lun0.img'), MiB);
        const cfg = dir.join('c.json');
        await fs.writeFile(cfg, JSON.stringify({ site: 'ghost', admin: { port }, dataDir: dir.join('data'), luns: [{ name: 'lun0', path: img }] }));
        const r = await cli(['status', '--config', cfg]);
        expect(r.code, why(r)).to.equal(3);
        expect(r.stdout).to.equal('');
        expect(lines(r.stderr), r.stderr).to.have.length(1);
        expect(r.stderr).to.include('"ghost"');
        expect(r.stderr).to.include(`127.0.0.1:${port}`);
      } finally {
        await dir.cleanup();
      }
    });
  });

  describe('against a running mirrored pair (a: lun0 sync + lun1 async primaries; b: their secondaries)', function () {
    const SIZE = 16 * MiB;
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let pair: Pair;
    let f: string[];

    before(async function () {
      dir = await tmpDir('nbd-cli-pair-');
      cleanup.add('tmp dir', () => dir.cleanup());
      f = await Promise.all(['a0', 'a1', 'b0', 'b1'].map((n) => sparseFile(dir.join(`${n}.img`), SIZE)));
      pair = await startPair({
        a: {
          luns: [{ name: 'lun0', path: f[0], role: 'primary', mirror: 'sync' }, { name: 'lun1', path: f[1], role: 'primary', mirror: 'async' }],
          mirror: { heartbeat: SHORT_HEARTBEAT },
        },
        b: {
          luns: [{ name: 'lun0', path: f[2], role: 'secondary', mirror: 'none' }, { name: 'lun1', path: f[3], role: 'secondary', mirror: 'none' }],
          mirror: { heartbeat: SHORT_HEARTBEAT },
        },
        connections: 3,
      });
      cleanup.add('pair', () => pair.stop());
      await waitLunStates(pair.a, { lun0: 'uptodate', lun1: 'uptodate' }, 20_000);
      await waitLunStates(pair.b, { lun0: 'secondary-uptodate', lun1: 'secondary-uptodate' }, 20_000);
    });
    after(async function () { await cleanup.run(); });

    it('status --config A: exit 0, "site a", a header row and one row per LUN', async function () {
      const r = await cli(['status', '--config', pair.a.configPath]);
      expect(r.code, why(r)).to.equal(0);
      expect(r.stderr).to.equal('');
      const out = lines(r.stdout);
      expect(out[0]).to.match(SITE_LINE('a', 'b'));
      expect(cells(out[1])).to.deep.equal(HEADER);
      expect(out.slice(2), r.stdout).to.have.length(3);
      const rows = out.slice(2, 4).map(cells);
      for (const row of rows) expect(row, JSON.stringify(row)).to.have.length(HEADER.length);
      // LUN ROLE MODE STATE PROTECTION PROGRESS ETA JOURNAL LAG SIZE HOSTS ... REASON
      expect(rows.map((row) => [...row.slice(0, 11), row[14]])).to.deep.equal([
        ['lun0', 'primary', 'sync', 'uptodate', 'peer', '-', '-', '0 B', '0 B', '16.0 MiB', '0', 'the peer has every change'],
        ['lun1', 'primary', 'async', 'uptodate', 'peer-async', '-', '-', '0 B', '0 B', '16.0 MiB', '0', 'the peer has every change'],
      ]);
      expect(out[4]).to.equal('2 LUNs: 2 uptodate; every mirrored primary protected by the peer');
    });

    it('status --config B: the secondaries, mode "secondary", state secondary-uptodate', async function () {
      const r = await cli(['status', '--config', pair.b.configPath]);
      expect(r.code, why(r)).to.equal(0);
      const out = lines(r.stdout);
      expect(out[0]).to.match(SITE_LINE('b', 'a'));
      expect(cells(out[1])).to.deep.equal(HEADER);
      expect(out.slice(2, 4).map((l) => cells(l).slice(0, 5))).to.deep.equal([
        ['lun0', 'secondary', 'secondary', 'secondary-uptodate', '-'],
        ['lun1', 'secondary', 'secondary', 'secondary-uptodate', '-'],
      ]);
      expect(out[4]).to.equal('2 LUNs: 2 secondary-uptodate; no mirrored primaries here');
    });

    it('status --json: parses; site, luns[].name/role/mode/state, mirror.connections', async function () {
      const r = await cli(['status', '--config', pair.a.configPath, '--json']);
      expect(r.code, why(r)).to.equal(0);
      const st = JSON.parse(r.stdout) as {
        site: string; luns: Array<{ name: string; role: string; mode: string; state: string }>;
        mirror: { connections: Array<{ index: number; status: string }> };
      };
      expect(st.site).to.equal('a');
      expect(st.luns.map((l) => [l.name, l.role, l.mode, l.state])).to.deep.equal([
        ['lun0', 'primary', 'sync', 'uptodate'], ['lun1', 'primary', 'async', 'uptodate'],
      ]);
      // The ETA (null: nothing to catch up), protection and the process's memory are in the JSON.
      const full = JSON.parse(r.stdout) as {
        luns: Array<Record<string, unknown>>; process: { rssBytes: number }; summary: { luns: number; localOnly: string[] };
      };
      for (const l of full.luns) {
        expect(l, l.name as string).to.have.property('etaSeconds', null);
        expect(l, l.name as string).to.have.property('catchup', null);
      }
      expect(full.luns.map((l) => l.protection)).to.deep.equal(['peer', 'peer-async']);
      expect(full.process.rssBytes).to.be.above(MiB);
      expect(full.summary).to.include({ luns: 2 });
      expect(full.summary.localOnly).to.deep.equal([]);
      expect(st.mirror.connections).to.have.length(3);
      expect(st.mirror.connections.map((c) => c.index).sort()).to.deep.equal([0, 1, 2]);
      for (const c of st.mirror.connections) expect(c.status).to.equal('up');
    });

    it('status --watch 0.2: redraws the table (timestamp + table) until killed', async function () {
      const proc = spawn(process.execPath, [cliPath(), 'status', '--config', pair.a.configPath, '--watch', '0.2'], {
        env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      let err = '';
      proc.stdout.setEncoding('utf8').on('data', (c: string) => { out += c; });
      proc.stderr.setEncoding('utf8').on('data', (c: string) => { err += c; });
      const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
      const headerCount = () => lines(out).filter((l) => cells(l).join(' ') === HEADER.join(' ')).length;
      try {
        await pollUntil(() => headerCount() >= 3, { timeoutMs: 15_000, intervalMs: 50, what: '3 redraws' });
      } catch (e) {
        throw new Error(`${(e as Error).message}\n--- stdout ---\n${out}\n--- stderr ---\n${err}`);
      } finally {
        proc.kill('SIGTERM');
      }
      const exit = await exited;
      expect(exit.signal).to.equal('SIGTERM');
      expect(err).to.equal('');
      // Each redraw: an ISO timestamp, the site line, the header, the two LUN rows, the summary.
      const frames = out.split(/^(?=\d{4}-\d\d-\d\dT)/m).filter((f) => f.trim().length > 0);
      const complete = frames.filter((f) => lines(f).length === 6);
      expect(complete.length, out).to.be.at.least(3);
      const stamps: number[] = [];
      for (const f of complete) {
        const l = lines(f);
        stamps.push(Date.parse(l[0]));
        expect(l[1]).to.match(SITE_LINE('a', 'b'));
        expect(cells(l[2])).to.deep.equal(HEADER);
        expect(l[5]).to.match(/^2 LUNs: /);
        expect(cells(l[3]).slice(0, 2)).to.deep.equal(['lun0', 'primary']);
        expect(cells(l[4]).slice(0, 2)).to.deep.equal(['lun1', 'primary']);
      }
      for (let i = 1; i < stamps.length; i++) {
        const gap = stamps[i] - stamps[i - 1];
        expect(gap, `redraw interval ${gap} ms`).to.be.within(150, 2000);
      }
    });

    it('status --watch with a non-positive interval: exit 2', async function () {
      const r = await cli(['status', '--config', pair.a.configPath, '--watch', '0']);
      expect(r.code, why(r)).to.equal(2);
      expect(r.stderr).to.include('--watch');
    });

    it('journal inspect lun0 before any outage: exit 0, no records', async function () {
      const r = await cli(['journal', 'inspect', 'lun0', '--config', pair.a.configPath]);
      expect(r.code, why(r)).to.equal(0);
      expect(r.stdout).to.match(/^records {3}0$|no journal/m);
      const rj = await cli(['journal', 'inspect', 'lun0', '--config', pair.a.configPath, '--json']);
      expect(rj.code, why(rj)).to.equal(0);
      const j = JSON.parse(rj.stdout) as JournalJson;
      expect(j.records).to.equal(0);
      expect(j.entries).to.deep.equal([]);
      expect(j.corrupt).to.equal(null);
    });

    it('journal inspect lun0 while b is frozen (SIGSTOP): the writes are journal records; after SIGCONT the journal drains', async function () {
      const pid = pair.b.proc.pid!;
      const writes: Array<[number, number, number]> = [[0x11, 0, 4096], [0x22, 65536, 8192], [0x33, 1048576, 512]];
      process.kill(pid, 'SIGSTOP');
      let frozen = true;
      try {
        // Sync mode: the first write waits until the heartbeat timeout declares the link down, then
        // it and the others go to the journal.
        await qemuWrites(pair.a.uri('lun0'), writes);
        const r = await cli(['journal', 'inspect', 'lun0', '--config', pair.a.configPath]);
        expect(r.code, why(r)).to.equal(0);
        const m = /^records {3}(\d+) \(seq (\d+)\.\.(\d+)\)$/m.exec(r.stdout);
        expect(m, r.stdout).to.not.equal(null);
        expect(Number(m![1])).to.equal(writes.length);
        expect(r.stdout).to.match(/^oldest {4}\d+\.\d s ago$/m);
        expect(r.stdout).to.not.include('CORRUPT');

        const rj = await cli(['journal', 'inspect', 'lun0', '--config', pair.a.configPath, '--json']);
        expect(rj.code, why(rj)).to.equal(0);
        const j = JSON.parse(rj.stdout) as JournalJson;
        expect(j.exists).to.equal(true);
        expect(j.records).to.equal(writes.length);
        expect(j.entries.map((e) => [e.kind, e.offset, e.length])).to.deep.equal(writes.map(([, off, len]) => ['write', off, len]));
        const seqs = j.entries.map((e) => e.seq);
        expect(seqs).to.deep.equal([...seqs].sort((x, y) => x - y));
        expect(new Set(seqs).size).to.equal(seqs.length);
        expect(j.minSeq).to.equal(seqs[0]);
        expect(j.maxSeq).to.equal(seqs.at(-1));
        expect(j.bytes).to.equal(writes.reduce((s, [, , len]) => s + 52 + len, 0));
        expect(j.oldestAgeMs).to.be.a('number').and.at.least(0);
      } finally {
        if (frozen) process.kill(pid, 'SIGCONT');
        frozen = false;
      }
      await waitLunStates(pair.a, { lun0: 'uptodate' }, 30_000);
      const after = await cli(['journal', 'inspect', 'lun0', '--config', pair.a.configPath, '--json']);
      expect(after.code, why(after)).to.equal(0);
      expect((JSON.parse(after.stdout) as JournalJson).records, 'records after the replay').to.equal(0);
      // ... and the replayed writes are in b's copy.
      const st = await siteStatus(pair.b);
      expect(st.luns.find((l) => l.name === 'lun0')!.state).to.equal('secondary-uptodate');
      for (const [p, off, len] of writes) {
        expect((await readAt(f[2], off, len)).equals(Buffer.alloc(len, p)), `b's lun0 at ${off}`).to.equal(true);
      }
    });
  });

  describe('journal inspect of a corrupt journal (lone primary, peer on a closed port)', function () {
    const cleanup = new Cleanup();
    let dir: TmpDir;
    let site: Site;
    let lunFile: string;

    before(async function () {
      dir = await tmpDir('nbd-cli-corrupt-');
      cleanup.add('tmp dir', () => dir.cleanup());
      lunFile = await sparseFile(dir.join('lun0.img'), 8 * MiB);
      const [listen, peer] = await Promise.all([closedPort(), closedPort()]);
      site = await startSite({
        site: 'a',
        mirror: { listen: { host: '127.0.0.1', port: listen }, peer: { host: '127.0.0.1', port: peer, site: 'b' }, reconnectMs: 200 },
        luns: [{ name: 'lun0', path: lunFile, role: 'primary', mirror: 'sync' }],
      });
      cleanup.add('site', () => site.stop());
    });
    after(async function () { await cleanup.run(); });

    it('a flipped byte in the middle record: exit 1 and "CORRUPT"; inspect leaves the file unchanged', async function () {
      // The peer was never reachable: every write is journaled.
      await qemuWrites(site.uri('lun0'), [[0xa1, 0, 4096], [0xa2, 8192, 4096], [0xa3, 16384, 4096]]);
      const good = await cli(['journal', 'inspect', 'lun0', '--config', site.configPath, '--json']);
      expect(good.code, why(good)).to.equal(0);
      expect((JSON.parse(good.stdout) as JournalJson).records).to.equal(3);

      // A copy of the dataDir, with one byte of the middle record's data flipped.
      const copy = dir.join('data-copy');
      // (Not the admin socket: a socket cannot be copied, and inspect does not need it.)
      await fs.cp(site.config.dataDir, copy, { recursive: true, filter: (src) => !src.endsWith('admin.sock') });
      const journal = path.join(copy, 'lun0.journal');
      const buf = await fs.readFile(journal);
      const recs = recordPositions(buf, 'lun0');
      expect(recs).to.have.length(3);
      const mid = recs[1];
      buf[mid.pos + 52 + 100] ^= 0xff;
      await fs.writeFile(journal, buf);
      const cfg = dir.join('copy.json');
      await fs.writeFile(cfg, JSON.stringify({ ...site.config, dataDir: copy }));
      const before = await sha256(journal);
      const sizeBefore = (await fs.stat(journal)).size;
      const filesBefore = (await fs.readdir(copy)).sort();

      const r = await cli(['journal', 'inspect', 'lun0', '--config', cfg]);
      expect(r.code, why(r)).to.equal(1);
      expect(r.stdout).to.match(new RegExp(`^CORRUPT +at offset ${mid.pos}: `, 'm'));
      expect(r.stdout).to.match(/^records {3}1 \(seq/m);

      const rj = await cli(['journal', 'inspect', 'lun0', '--config', cfg, '--json']);
      expect(rj.code, why(rj)).to.equal(1);
      const j = JSON.parse(rj.stdout) as JournalJson;
      expect(j.corrupt).to.not.equal(null);
      expect(j.corrupt!.offset).to.equal(mid.pos);
      expect(j.corrupt!.reason).to.include('CRC mismatch');
      expect(j.entries).to.have.length(1);

      expect(await sha256(journal), 'journal bytes after inspect').to.equal(before);
      expect((await fs.stat(journal)).size).to.equal(sizeBefore);
      expect((await fs.readdir(copy)).sort(), 'no file added (no .corrupt copy)').to.deep.equal(filesBefore);
    });
  });

  describe('the status table of a LUN catching up (formatStatus)', function () {
    it('progress, ETA, journal with its age, lag and reason per LUN; the summary names the local-only LUNs', function () {
      const body = {
        site: 'a', process: { rssBytes: 100 * MiB, heapUsedBytes: 20 * MiB }, mirror: { peer: 'b', link: 'up', health: 'up' },
        luns: [
          { name: 'lun0', role: 'primary', mode: 'sync', state: 'resyncing', reason: '10 regions to copy', size: 64 * MiB, hosts: 2,
            counters: { writeOps: 5, writeBytes: MiB, readOps: 1 }, protection: 'local-only', etaSeconds: 65,
            catchup: { done: 42, total: 100, percent: 42 }, journal: { bytes: MiB, oldestAgeMs: 3000 }, lagBytes: 4096 },
          { name: 'lun1', role: 'secondary', mode: 'secondary', state: 'secondary-uptodate', size: 64 * MiB, hosts: 0,
            counters: { writeOps: 0, writeBytes: 0, readOps: 0 } },
        ],
      };
      const out = lines(formatStatus(body));
      expect(out[0]).to.equal('site a  (peer b, link up; rss 100.0 MiB, heap 20.0 MiB)');
      expect(cells(out[1])).to.deep.equal(HEADER);
      expect(cells(out[2])).to.deep.equal(['lun0', 'primary', 'sync', 'resyncing', 'local-only', '42%', '1m05s', '1.0 MiB (3s old)', '4.0 KiB',
        '64.0 MiB', '2', '5', '1.0 MiB', '1', '10 regions to copy']);
      expect(cells(out[3])).to.have.length(HEADER.length);
      expect(out[4]).to.equal('2 LUNs: 1 resyncing, 1 secondary-uptodate; local-only: lun0 (resyncing, ETA 1m05s); journals 1.0 MiB');
      expect([duration(0), duration(59.6), duration(3600 + 7 * 60 + 9)]).to.deep.equal(['0s', '1m00s', '1h07m']);
    });
  });
});
