// The admin endpoint of a real mirrored pair: GET /metrics parsed with a small strict parser of
// the Prometheus text exposition format (0.0.4), the documented metrics present, counters moving
// under real load (nbdcopy) and never going backwards; GET /status; unknown paths.
import { expect } from 'chai';
import http from 'node:http';
import { siteStatus, startPair, waitDrained, waitLunStates, type Pair } from '../helpers/pair.js';
import { Cleanup, exec, freePorts, pollUntil, randomFile, sha256File, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';
import type { TmpDir } from '../helpers/tmp.js';
import { LINK_HEALTH_STATES, PRIMARY_STATES, SECONDARY_STATES, Metrics, VERSION, type MetricsSnapshot } from '../../src/admin/metrics.js';
import { CMD } from '../../src/nbd/constants.js';

const MiB = 1024 * 1024;
const SHORT_HEARTBEAT = { intervalMs: 200, timeoutMs: 600, probationMs: 1000 };

// ---- a strict parser of the text exposition format -----------------------------------------

type Labels = Record<string, string>;
interface Sample { name: string; labels: Labels; value: number }
interface Family { name: string; type: string; help: string | null; samples: Sample[] }
type Exposition = Map<string, Family>;

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * A sample value: a float as Go's strconv.ParseFloat reads it (the 0.0.4 format's definition),
 * so also case-insensitive NaN/Inf/Infinity. (prom-client writes NaN as "Nan", e.g. the event
 * loop lag mean before the first sample; Prometheus reads that.)
 */
function parseValue(s: string, where: string): number {
  if (/^\+?inf(inity)?$/i.test(s)) return Infinity;
  if (/^-inf(inity)?$/i.test(s)) return -Infinity;
  if (/^[-+]?nan$/i.test(s)) return NaN;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(s)) throw new Error(`${where}: bad value ${JSON.stringify(s)}`);
  return Number(s);
}

/** Parse `{a="x",b="y"}` starting at text[i] === '{'; returns the labels and the index after '}'. */
function parseLabels(text: string, i: number, where: string): [Labels, number] {
  const labels: Labels = {};
  i++;
  for (;;) {
    if (text[i] === '}') return [labels, i + 1];
    const m = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(text.slice(i));
    if (!m) throw new Error(`${where}: bad label name at ${JSON.stringify(text.slice(i))}`);
    const name = m[0];
    i += name.length;
    if (text[i] !== '=' || text[i + 1] !== '"') throw new Error(`${where}: expected =" after label ${name}`);
    i += 2;
    let value = '';
    for (;;) {
      const c = text[i];
      if (c === undefined) throw new Error(`${where}: unterminated label value`);
      if (c === '"') { i++; break; }
      if (c === '\\') {
        const e = text[i + 1];
        if (e === '\\') value += '\\';
        else if (e === '"') value += '"';
        else if (e === 'n') value += '\n';
        else throw new Error(`${where}: bad escape \\${e} in label value`);
        i += 2;
        continue;
      }
      value += c;
      i++;
    }
    if (name in labels) throw new Error(`${where}: label ${name} repeated`);
    labels[name] = value;
    if (text[i] === ',') i++;
    else if (text[i] !== '}') throw new Error(`${where}: expected , or } after label ${name}`);
  }
}

/** The family a sample name belongs to, given the declared families. */
function familyOf(name: string, families: Exposition): Family | undefined {
  const direct = families.get(name);
  if (direct && direct.type !== 'histogram' && direct.type !== 'summary') return direct;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!name.endsWith(suffix)) continue;
    const f = families.get(name.slice(0, -suffix.length));
    if (f && (f.type === 'histogram' || (f.type === 'summary' && suffix !== '_bucket'))) return f;
  }
  if (direct?.type === 'summary') return direct;
  return undefined;
}

function labelKey(labels: Labels, omit: string[] = []): string {
  return JSON.stringify(Object.keys(labels).filter((k) => !omit.includes(k)).sort().map((k) => [k, labels[k]]));
}

/**
 * Parse the exposition text. Throws on anything the format does not allow: a sample of an
 * undeclared family, TYPE after samples, a family split in two groups, duplicate samples,
 * malformed labels or values, histograms whose buckets are not cumulative or lack le="+Inf".
 */
function parseExposition(text: string): Exposition {
  if (!text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  const families: Exposition = new Map();
  const seen = new Set<string>();
  let current: Family | null = null;
  const closed = new Set<string>();
  text.slice(0, -1).split('\n').forEach((line, n) => {
    const where = `line ${n + 1} ${JSON.stringify(line)}`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (!m) return;   // any other comment
      const [, kind, name, rest = ''] = m;
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name`);
      let f = families.get(name);
      if (f && closed.has(name)) throw new Error(`${where}: family ${name} appears in two groups`);
      if (!f) {
        f = { name, type: 'untyped', help: null, samples: [] };
        families.set(name, f);
      }
      if (current && current !== f) closed.add(current.name);
      current = f;
      if (kind === 'HELP') {
        if (f.help !== null) throw new Error(`${where}: second HELP for ${name}`);
        f.help = rest.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
      } else {
        if (!TYPES.has(rest)) throw new Error(`${where}: unknown type ${rest}`);
        if (f.samples.length) throw new Error(`${where}: TYPE after samples of ${name}`);
        if ((f as Family & { typed?: boolean }).typed) throw new Error(`${where}: second TYPE for ${name}`);
        (f as Family & { typed?: boolean }).typed = true;
        f.type = rest;
      }
      return;
    }
    const nm = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!nm) throw new Error(`${where}: bad sample name`);
    const name = nm[0];
    let i = name.length;
    let labels: Labels = {};
    if (line[i] === '{') [labels, i] = parseLabels(line, i, where);
    if (line[i] !== ' ') throw new Error(`${where}: expected a space before the value`);
    const parts = line.slice(i + 1).split(' ');
    if (parts.length < 1 || parts.length > 2) throw new Error(`${where}: expected "value [timestamp]"`);
    const value = parseValue(parts[0], where);
    if (parts.length === 2 && !/^-?\d+$/.test(parts[1])) throw new Error(`${where}: bad timestamp`);
    const f = familyOf(name, families);
    if (!f) throw new Error(`${where}: sample of an undeclared family`);
    if (closed.has(f.name)) throw new Error(`${where}: family ${f.name} appears in two groups`);
    if (current && current !== f) closed.add(current.name);
    current = f;
    if (name.endsWith('_bucket') && f.type === 'histogram' && !('le' in labels)) throw new Error(`${where}: bucket without le`);
    for (const k of Object.keys(labels)) if (!LABEL_NAME.test(k) || k.startsWith('__')) throw new Error(`${where}: bad label ${k}`);
    const key = `${name}${labelKey(labels)}`;
    if (seen.has(key)) throw new Error(`${where}: duplicate sample`);
    seen.add(key);
    f.samples.push({ name, labels, value });
  });
  for (const f of families.values()) {
    if (f.type !== 'histogram') continue;
    const series = new Map<string, Sample[]>();
    for (const s of f.samples) {
      const k = labelKey(s.labels, ['le']);
      if (!series.has(k)) series.set(k, []);
      series.get(k)!.push(s);
    }
    for (const [k, ss] of series) {
      const buckets = ss.filter((s) => s.name === `${f.name}_bucket`).map((s) => ({ le: parseValue(s.labels.le, f.name), v: s.value }));
      const count = ss.find((s) => s.name === `${f.name}_count`);
      const sum = ss.find((s) => s.name === `${f.name}_sum`);
      if (!count || !sum) throw new Error(`histogram ${f.name}${k}: missing _count or _sum`);
      if (buckets.at(-1)?.le !== Infinity) throw new Error(`histogram ${f.name}${k}: last bucket is not le="+Inf"`);
      for (let i = 1; i < buckets.length; i++) {
        if (!(buckets[i].le > buckets[i - 1].le)) throw new Error(`histogram ${f.name}${k}: le not increasing`);
        if (buckets[i].v < buckets[i - 1].v) throw new Error(`histogram ${f.name}${k}: buckets not cumulative`);
      }
      if (buckets.at(-1)!.v !== count.value) throw new Error(`histogram ${f.name}${k}: +Inf bucket ${buckets.at(-1)!.v} != _count ${count.value}`);
    }
  }
  return families;
}

/** The value of the one sample `name` whose labels include `labels`; throws if none or several. */
function value(exp: Exposition, name: string, labels: Labels = {}): number {
  const f = familyOf(name, exp);
  if (!f) throw new Error(`no family for ${name}`);
  const hits = f.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (hits.length !== 1) throw new Error(`${hits.length} samples ${name}${JSON.stringify(labels)}`);
  return hits[0].value;
}

function family(exp: Exposition, name: string, type: string): Family {
  const f = exp.get(name);
  expect(f, `family ${name}`).to.not.equal(undefined);
  expect(f!.type, `TYPE of ${name}`).to.equal(type);
  expect(f!.help, `HELP of ${name}`).to.be.a('string').that.is.not.empty;
  return f!;
}

// ---- HTTP -----------------------------------------------------------------------------------

interface Reply { status: number; type: string; body: string }

function request(site: Site, path: string, method = 'GET'): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: site.adminPort, path, method, timeout: 5000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

async function scrape(site: Site): Promise<Exposition> {
  const r = await request(site, '/metrics');
  expect(r.status, r.body).to.equal(200);
  return parseExposition(r.body);
}

/** Every counter (and histogram) sample of `before` is present in `after` with a value at least as large. */
function expectMonotone(before: Exposition, after: Exposition, site: string): number {
  let checked = 0;
  for (const f of before.values()) {
    if (f.type !== 'counter' && f.type !== 'histogram') continue;
    const g = after.get(f.name);
    expect(g, `${site}: family ${f.name} disappeared`).to.not.equal(undefined);
    for (const s of f.samples) {
      const t = g!.samples.find((x) => x.name === s.name && labelKey(x.labels) === labelKey(s.labels));
      expect(t, `${site}: ${s.name}${JSON.stringify(s.labels)} disappeared`).to.not.equal(undefined);
      expect(t!.value, `${site}: ${s.name}${JSON.stringify(s.labels)} went from ${s.value} to ${t!.value}`).to.be.at.least(s.value);
      checked++;
    }
  }
  return checked;
}

/** nbd_mirror_lun_state: per LUN exactly one state is 1 (the others 0); returns LUN -> state. */
function lunStates(exp: Exposition): Record<string, string> {
  const f = family(exp, 'nbd_mirror_lun_state', 'gauge');
  const out: Record<string, string> = {};
  const luns = new Set(f.samples.map((s) => s.labels.lun));
  for (const lun of luns) {
    const mine = f.samples.filter((s) => s.labels.lun === lun);
    for (const s of mine) expect([0, 1], `${lun} ${s.labels.state}`).to.include(s.value);
    const on = mine.filter((s) => s.value === 1);
    expect(on, `LUN ${lun}: states at 1`).to.have.length(1);
    out[lun] = on[0].labels.state;
  }
  return out;
}

describe('admin endpoint: /metrics and /status of a mirrored pair (a: lun0 primary sync; b: lun0 secondary)', function () {
  this.timeout(90_000);
  const SIZE = 64 * MiB;
  const cleanup = new Cleanup();
  let dir: TmpDir;
  let pair: Pair;
  let fileA: string;
  let fileB: string;

  before(async function () {
    dir = await tmpDir('nbd-metrics-');
    cleanup.add('tmp dir', () => dir.cleanup());
    fileA = await sparseFile(dir.join('a0.img'), SIZE);
    fileB = await sparseFile(dir.join('b0.img'), SIZE);
    pair = await startPair({
      a: { luns: [{ name: 'lun0', path: fileA, role: 'primary', mirror: 'sync' }], mirror: { heartbeat: SHORT_HEARTBEAT } },
      b: { luns: [{ name: 'lun0', path: fileB, role: 'secondary', mirror: 'none' }], mirror: { heartbeat: SHORT_HEARTBEAT } },
      connections: 4,
    });
    cleanup.add('pair', () => pair.stop());
    await waitLunStates(pair.a, { lun0: 'uptodate' }, 20_000);
    await waitLunStates(pair.b, { lun0: 'secondary-uptodate' }, 20_000);
  });
  after(async function () { await cleanup.run(); });

  it('GET /metrics: Prometheus text format 0.0.4 that the strict parser accepts, every family with HELP and TYPE', async function () {
    for (const site of [pair.a, pair.b]) {
      const r = await request(site, '/metrics');
      expect(r.status).to.equal(200);
      expect(r.type).to.match(/^text\/plain; version=0\.0\.4/);
      const exp = parseExposition(r.body);
      expect(exp.size).to.be.above(20);
      for (const f of exp.values()) {
        // Ours carry the prefix; prom-client's standard process and Node.js metrics keep their names.
        expect(f.name, 'prefix').to.match(/^(nbd_mirror_|process_|nodejs_)/);
        if (f.type === 'gauge') expect(f.name, 'a gauge named like a counter').to.not.match(/_total$/);
        if (f.type === 'counter') expect(f.name, 'a counter without _total').to.match(/_total$/);
        expect(f.help, `HELP of ${f.name}`).to.be.a('string');
        expect(f.type, `TYPE of ${f.name}`).to.not.equal('untyped');
        if (f.type === 'counter') for (const s of f.samples) expect(s.value, s.name).to.be.at.least(0);
      }
    }
  });

  it('the parser itself rejects malformed expositions', function () {
    const bad = [
      'nbd_x 1\n',                                                   // no TYPE/HELP: undeclared family
      '# TYPE a counter\na{l="x} 1\n',                                // unterminated label value
      '# TYPE a counter\na 1\na 2\n',                                 // duplicate sample
      '# TYPE a gauge\na one\n',                                      // bad value
      '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',   // not cumulative
      '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', // no +Inf
      '# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x="1"} 2\n',       // family in two groups
      '# TYPE a gauge\na 1',                                          // no final newline
    ];
    for (const text of bad) expect(() => parseExposition(text), JSON.stringify(text)).to.throw();
    const ok = parseExposition('# HELP a A \\n doc.\n# TYPE a counter\na{l="q\\"\\\\"} 3 1700000000000\n');
    expect(value(ok, 'a', { l: 'q"\\' })).to.equal(3);
    const special = parseExposition('# TYPE g gauge\ng{x="1"} Nan\ng{x="2"} +Inf\ng{x="3"} -Inf\ng{x="4"} 1.5e-3\n');
    expect(Number.isNaN(value(special, 'g', { x: '1' }))).to.equal(true);
    expect([value(special, 'g', { x: '2' }), value(special, 'g', { x: '3' }), value(special, 'g', { x: '4' })]).to.deep.equal([Infinity, -Infinity, 0.0015]);
  });

  it('the documented metrics are present on both sites, with lun (and state) labels', async function () {
    const exp = await pollUntil(async () => {
      const e = await scrape(pair.a);
      // RTT and received heartbeats need a round or two of heartbeats; the initial sync's bits
      // clear once its regions were quiet for 2 s.
      return value(e, 'nbd_mirror_heartbeat_rtt_seconds') > 0 && value(e, 'nbd_mirror_heartbeats_received_total') > 0
        && value(e, 'nbd_mirror_dirty_regions', { lun: 'lun0' }) === 0 && e;
    }, { timeoutMs: 15_000, what: 'heartbeat RTT, received heartbeats and an empty bitmap on a' });

    for (const name of ['nbd_mirror_lun_read_ops_total', 'nbd_mirror_lun_write_ops_total', 'nbd_mirror_lun_write_bytes_total',
      'nbd_mirror_lun_read_bytes_total', 'nbd_mirror_lun_errors_total', 'nbd_mirror_mirrored_ops_total', 'nbd_mirror_mirrored_bytes_total',
      'nbd_mirror_mirror_failures_total']) {
      family(exp, name, 'counter');
      expect(value(exp, name, { lun: 'lun0' }), name).to.be.at.least(0);
    }
    for (const name of ['nbd_mirror_mirror_inflight_requests', 'nbd_mirror_async_lag_bytes', 'nbd_mirror_journal_bytes',
      'nbd_mirror_journal_records', 'nbd_mirror_journal_oldest_record_age_seconds', 'nbd_mirror_dirty_regions']) {
      family(exp, name, 'gauge');
      expect(value(exp, name, { lun: 'lun0' }), name).to.equal(0);   // uptodate, idle: nothing in flight or journaled
    }
    // Catch-up metrics: declared; no sample while there is nothing to catch up.
    for (const name of ['nbd_mirror_replay_progress_ratio', 'nbd_mirror_resync_progress_ratio', 'nbd_mirror_catchup_eta_seconds']) {
      family(exp, name, 'gauge');
    }
    family(exp, 'nbd_mirror_request_duration_seconds', 'histogram');
    expect(lunStates(exp)).to.deep.equal({ lun0: 'uptodate' });
    expect(exp.get('nbd_mirror_lun_state')!.samples).to.have.length(PRIMARY_STATES.length);   // every state of a primary, once
    family(exp, 'nbd_mirror_site_request_duration_seconds', 'histogram');
    for (const name of ['nbd_mirror_sync_progress_ratio', 'nbd_mirror_sync_equal_bytes_total', 'nbd_mirror_resynced_bytes_total']) {
      expect(exp.has(name), name).to.equal(true);
    }
    family(exp, 'nbd_mirror_peer_connections_up', 'gauge');
    expect(value(exp, 'nbd_mirror_peer_connections_up')).to.equal(4);
    family(exp, 'nbd_mirror_heartbeats_received_total', 'counter');
    family(exp, 'nbd_mirror_heartbeats_sent_total', 'counter');
    expect(value(exp, 'nbd_mirror_heartbeats_sent_total')).to.be.above(0);
    family(exp, 'nbd_mirror_heartbeat_rtt_seconds', 'gauge');
    expect(value(exp, 'nbd_mirror_heartbeat_rtt_seconds')).to.be.above(0).and.below(1);
    expect(value(exp, 'nbd_mirror_heartbeat_silence_seconds')).to.be.at.least(0).and.below(SHORT_HEARTBEAT.timeoutMs / 1000);

    const expB = await scrape(pair.b);
    expect(lunStates(expB)).to.deep.equal({ lun0: 'secondary-uptodate' });
    expect(expB.get('nbd_mirror_lun_state')!.samples).to.have.length(SECONDARY_STATES.length);   // every state of a secondary, once
    family(expB, 'nbd_mirror_secondary_applied_ops_total', 'counter');
    expect(value(expB, 'nbd_mirror_secondary_applied_bytes_total', { lun: 'lun0' })).to.be.at.least(0);
    expect(value(expB, 'nbd_mirror_heartbeats_received_total')).to.be.above(0);

    // The state gauge says what /status says.
    const st = await siteStatus(pair.a);
    expect(st.luns.map((l) => l.state)).to.deep.equal(['uptodate']);

    // Standard process metrics, unprefixed; the site's size, hosts, roles, link and build.
    family(exp, 'process_resident_memory_bytes', 'gauge');
    expect(value(exp, 'process_resident_memory_bytes')).to.be.above(10 * MiB).and.below(1024 * MiB);
    family(exp, 'nodejs_heap_size_used_bytes', 'gauge');
    expect(value(exp, 'nodejs_heap_size_used_bytes')).to.be.above(0);
    expect(exp.has('nbd_mirror_process_resident_memory_bytes'), 'no prefixed copy').to.equal(false);
    expect(exp.has('nodejs_active_handles_total'), 'the _total gauge of prom-client is dropped').to.equal(false);
    family(exp, 'nodejs_active_handles', 'gauge');
    family(exp, 'nbd_mirror_lun_size_bytes', 'gauge');
    expect(value(exp, 'nbd_mirror_lun_size_bytes', { lun: 'lun0' })).to.equal(SIZE);
    family(exp, 'nbd_mirror_lun_hosts', 'gauge');
    expect(value(exp, 'nbd_mirror_lun_hosts', { lun: 'lun0' })).to.equal(0);
    family(exp, 'nbd_mirror_lun_info', 'gauge');
    expect(value(exp, 'nbd_mirror_lun_info', { lun: 'lun0', role: 'primary', mode: 'sync' })).to.equal(1);
    family(exp, 'nbd_mirror_lun_peer_protected', 'gauge');
    expect(value(exp, 'nbd_mirror_lun_peer_protected', { lun: 'lun0' }), 'sync + uptodate: protected by the peer').to.equal(1);
    family(exp, 'nbd_mirror_link_up', 'gauge');
    expect(value(exp, 'nbd_mirror_link_up')).to.equal(1);
    const link = family(exp, 'nbd_mirror_link_state', 'gauge').samples;
    expect(link.map((x) => x.labels.state).sort()).to.deep.equal([...LINK_HEALTH_STATES].sort());
    const health = (st.mirror as unknown as { health: string }).health;
    expect(link.filter((x) => x.value === 1).map((x) => x.labels.state), 'link_state = status mirror.health').to.deep.equal([health]);
    family(exp, 'nbd_mirror_build_info', 'gauge');
    expect(value(exp, 'nbd_mirror_build_info', { version: VERSION, node: process.version })).to.equal(1);
    expect(VERSION).to.match(/^\d+\.\d+\.\d+/);

    // /status: the process's memory, the LUN's protection, a summary.
    const full = st as unknown as {
      version: string; process: { rssBytes: number; heapUsedBytes: number; heapTotalBytes: number };
      luns: Array<{ protection: string; protectionReason: string | null; etaSeconds: number | null; catchup: unknown }>;
      summary: { luns: number; states: Record<string, number>; localOnly: string[]; journalBytes: number };
    };
    expect(full.version).to.equal(VERSION);
    expect(full.process.rssBytes).to.be.above(10 * MiB).and.below(1024 * MiB);
    expect(full.process.heapUsedBytes).to.be.above(0).and.at.most(full.process.heapTotalBytes);
    expect(full.luns[0]).to.include({ protection: 'peer', protectionReason: null, etaSeconds: null, catchup: null });
    expect(full.summary).to.deep.equal({ luns: 1, states: { uptodate: 1 }, localOnly: [], journalBytes: 0 });
    const stB = (await siteStatus(pair.b)) as unknown as { luns: Array<Record<string, unknown>>; summary: { localOnly: string[] } };
    expect(stB.luns[0].protection, 'a secondary has no protection field').to.equal(undefined);
    expect(stB.summary.localOnly).to.deep.equal([]);
  });

  it('under load (nbdcopy 32 MiB into a:lun0) the counters move, the histogram counts the writes, and no counter goes back', async function () {
    const src = await randomFile(dir.join('src.img'), 32 * MiB);
    const [a1, b1] = await Promise.all([scrape(pair.a), scrape(pair.b)]);
    await exec('nbdcopy', [src, pair.a.uri('lun0')], { timeoutMs: 60_000 });
    await waitDrained(pair.a, 'lun0');
    const [a2, b2] = await Promise.all([scrape(pair.a), scrape(pair.b)]);
    const d = (e1: Exposition, e2: Exposition, name: string, labels: Labels = { lun: 'lun0' }) => {
      const v1 = e1.get(familyOf(name, e1)?.name ?? '')?.samples.some((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
        ? value(e1, name, labels) : 0;
      return value(e2, name, labels) - v1;
    };
    const writeOps = d(a1, a2, 'nbd_mirror_lun_write_ops_total');
    const writeBytes = d(a1, a2, 'nbd_mirror_lun_write_bytes_total');
    expect(writeOps, 'write ops').to.be.above(0);
    expect(writeBytes, 'write bytes').to.equal(32 * MiB);
    expect(d(a1, a2, 'nbd_mirror_mirrored_bytes_total'), 'mirrored bytes').to.equal(32 * MiB);
    expect(d(a1, a2, 'nbd_mirror_mirrored_ops_total'), 'mirrored ops (sync: one per host write)').to.equal(writeOps);
    expect(d(a1, a2, 'nbd_mirror_mirror_failures_total'), 'mirror failures').to.equal(0);
    const hist = { lun: 'lun0', op: 'write' };
    expect(d(a1, a2, 'nbd_mirror_request_duration_seconds_count', hist), 'histogram _count{op="write"}').to.equal(writeOps);
    expect(d(a1, a2, 'nbd_mirror_request_duration_seconds_sum', hist), 'histogram _sum{op="write"}').to.be.above(0);
    const buckets = a2.get('nbd_mirror_request_duration_seconds')!.samples.filter((s) => s.name.endsWith('_bucket') && s.labels.op === 'write');
    expect(buckets.length).to.be.above(2);
    for (const s of buckets) expect(s.labels.lun).to.equal('lun0');
    expect(d(b1, b2, 'nbd_mirror_secondary_applied_bytes_total'), 'bytes applied on b').to.equal(32 * MiB);
    expect(d(b1, b2, 'nbd_mirror_secondary_applied_ops_total'), 'ops applied on b').to.equal(writeOps);
    expect(value(a2, 'nbd_mirror_mirror_inflight_requests', { lun: 'lun0' })).to.equal(0);
    expect(value(a2, 'nbd_mirror_async_lag_bytes', { lun: 'lun0' })).to.equal(0);
    expect(lunStates(a2)).to.deep.equal({ lun0: 'uptodate' });

    // Heartbeats are time-driven: wait for the next ones.
    const hb1 = value(a1, 'nbd_mirror_heartbeats_received_total');
    const a3 = await pollUntil(async () => {
      const e = await scrape(pair.a);
      return value(e, 'nbd_mirror_heartbeats_received_total') > hb1 && e;
    }, { timeoutMs: 5000, what: 'heartbeats received to go up' });

    expect(expectMonotone(a1, a2, 'a')).to.be.above(10);
    expect(expectMonotone(a2, a3, 'a')).to.be.above(10);
    expect(expectMonotone(b1, b2, 'b')).to.be.above(5);

    // Sync mirroring: the copies are equal right away.
    const [hs, ha, hb] = await Promise.all([sha256File(src), sha256File(fileA, 32 * MiB), sha256File(fileB, 32 * MiB)]);
    expect(ha).to.equal(hs);
    expect(hb).to.equal(hs);
  });

  it('while b is frozen (SIGSTOP) the journal metrics and the state show it; after SIGCONT the replay progress reaches 1', async function () {
    const pid = pair.b.proc.pid!;
    process.kill(pid, 'SIGSTOP');
    let frozen = true;
    try {
      await exec('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 65536', '-c', 'write -P 0x45 1048576 65536', pair.a.uri('lun0')], { timeoutMs: 30_000 });
      const exp = await scrape(pair.a);
      expect(value(exp, 'nbd_mirror_journal_records', { lun: 'lun0' })).to.equal(2);
      expect(value(exp, 'nbd_mirror_journal_bytes', { lun: 'lun0' })).to.equal(2 * (52 + 65536));
      expect(value(exp, 'nbd_mirror_journal_oldest_record_age_seconds', { lun: 'lun0' })).to.be.above(0);
      expect(['journaling', 'probation']).to.include(lunStates(exp).lun0);
      expect(value(exp, 'nbd_mirror_peer_connections_up')).to.equal(0);
      expect(value(exp, 'nbd_mirror_lun_peer_protected', { lun: 'lun0' }), 'journaling: local-only').to.equal(0);
      expect(value(exp, 'nbd_mirror_link_up')).to.equal(0);
      const st = (await siteStatus(pair.a)) as unknown as {
        luns: Array<{ protection: string; protectionReason: string }>; summary: { localOnly: string[]; journalBytes: number };
      };
      expect(st.luns[0].protection).to.equal('local-only');
      expect(st.luns[0].protectionReason).to.include('not reachable');
      expect(st.summary.localOnly).to.deep.equal(['lun0']);
      expect(st.summary.journalBytes).to.equal(2 * (52 + 65536));
    } finally {
      if (frozen) process.kill(pid, 'SIGCONT');
      frozen = false;
    }
    await waitLunStates(pair.a, { lun0: 'uptodate' }, 30_000);
    const exp = await scrape(pair.a);
    expect(value(exp, 'nbd_mirror_replay_progress_ratio', { lun: 'lun0' })).to.equal(1);
    expect(value(exp, 'nbd_mirror_journal_records', { lun: 'lun0' })).to.equal(0);
    expect(lunStates(exp)).to.deep.equal({ lun0: 'uptodate' });
    expect(await sha256File(fileB)).to.equal(await sha256File(fileA));
  });

  it('GET /status is JSON; an unknown path is 404 JSON; POST is 405', async function () {
    const st = await request(pair.a, '/status');
    expect(st.status).to.equal(200);
    expect(st.type).to.match(/^application\/json/);
    const body = JSON.parse(st.body) as { site: string; luns: Array<{ name: string }> };
    expect(body.site).to.equal('a');
    expect(body.luns.map((l) => l.name)).to.deep.equal(['lun0']);

    for (const p of ['/nope', '/metrics/extra', '/']) {
      const r = await request(pair.a, p);
      expect(r.status, p).to.equal(404);
      expect(r.type, p).to.match(/^application\/json/);
      const err = JSON.parse(r.body) as { error: string };
      expect(err.error, p).to.include(p);
    }
    const post = await request(pair.a, '/metrics', 'POST');
    expect(post.status).to.equal(405);
    expect((JSON.parse(post.body) as { error: string }).error).to.be.a('string');
  });
});

describe('admin endpoint: heartbeat metrics of a site that never heard its peer', function () {
  this.timeout(60_000);
  const cleanup = new Cleanup();
  let site: Site;

  before(async function () {
    const dir = await tmpDir('nbd-metrics-lone-');
    cleanup.add('tmp dir', () => dir.cleanup());
    const file = await sparseFile(dir.join('a0.img'), 8 * MiB);
    // The peer's port: free now, nobody listens there (TCP or UDP).
    const [listen, peer] = await freePorts(2);
    site = await startSite({
      site: 'a',
      mirror: { listen: { host: '127.0.0.1', port: listen }, peer: { host: '127.0.0.1', port: peer, site: 'b' }, heartbeat: SHORT_HEARTBEAT, reconnectMs: 200 },
      luns: [{ name: 'lun0', path: file, role: 'primary', mirror: 'sync' }],
    });
    cleanup.add('site', () => site.stop());
  });
  after(async function () { await cleanup.run(); });

  it('no heartbeat ever received: silence is not reported as 0 s and RTT is not reported as 0 s', async function () {
    // Wait until the site has been sending into the void for well over the heartbeat timeout.
    const exp = await pollUntil(async () => {
      const e = await scrape(site);
      return value(e, 'nbd_mirror_heartbeats_sent_total') >= 8 && e;
    }, { timeoutMs: 10_000, what: '8 heartbeats sent' });
    expect(value(exp, 'nbd_mirror_heartbeats_received_total')).to.equal(0);
    expect(lunStates(exp)).to.deep.equal({ lun0: 'connecting' });
    expect(value(exp, 'nbd_mirror_peer_connections_up')).to.equal(0);
    // "Time since the last valid heartbeat" is unknown (no sample) or at least the time spent
    // waiting; 0 would read as a perfectly healthy link to an alert on silence > timeout.
    const silence = family(exp, 'nbd_mirror_heartbeat_silence_seconds', 'gauge').samples;
    const silent = SHORT_HEARTBEAT.timeoutMs / 1000;
    expect(silence.length === 0 || silence[0].value > silent,
      `heartbeat_silence_seconds = ${JSON.stringify(silence.map((s) => s.value))} with no heartbeat ever received`).to.equal(true);
    // No RTT was ever measured: no sample (as when rttMs is null in /status), not 0.
    const rtt = family(exp, 'nbd_mirror_heartbeat_rtt_seconds', 'gauge').samples;
    expect(rtt.map((s) => s.value), 'heartbeat_rtt_seconds with no heartbeat ever received').to.deep.equal([]);
  });
});

describe('metrics: series of a site with 64 LUNs', function () {
  it('stays lean: every LUN with traffic of every command, fewer than 3,500 series (before: 5,241 with reads, writes and flushes; 9,593 with every command)', async function () {
    const luns: MetricsSnapshot['luns'] = Array.from({ length: 64 }, (_, i) => ({
      name: `lun${i}`, state: 'uptodate', role: 'primary', mode: 'sync', size: 1 << 30, hosts: 1, protection: 'peer',
      counters: { readOps: 1, readBytes: 1, writeOps: 1, writeBytes: 1, errors: 0 }, inflight: 0, lagBytes: 0, dirtyRegions: 0,
      mirrored: { ops: 1, bytes: 1, failures: 0, resyncedBytes: 0 }, journal: { records: 0, bytes: 0, oldestAgeMs: null },
      progress: { replayTotal: 0, replayDone: 0, resyncTotal: 0, resyncDone: 0, syncTotal: 0, syncDone: 0, startedMs: 0 },
      sync: { equalBytes: 0 },
    }));
    const metrics = new Metrics(() => ({
      luns, mirror: { peer: 'b', link: 'up', health: 'up', connections: [{ status: 'up' }], heartbeat: { sent: 1, received: 1, ignored: {}, lastReceivedMs: Date.now(), rttMs: 1 } },
    }));
    for (const l of luns) {
      const fake = { name: l.name, latency: null as null | ((type: number, s: number) => void) };
      metrics.instrument(fake);
      for (const type of [CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS]) fake.latency!(type, 0.001);
    }
    const exp = parseExposition(await metrics.text());
    let series = 0;
    for (const f of exp.values()) series += f.samples.length;
    const hist = exp.get('nbd_mirror_request_duration_seconds')!.samples;
    expect(new Set(hist.map((x) => x.labels.op))).to.deep.equal(new Set(['read', 'write']));
    expect(hist.filter((x) => x.labels.lun === 'lun0').length, 'histogram series per LUN').to.equal(2 * (7 + 1 + 2));
    const site = exp.get('nbd_mirror_site_request_duration_seconds')!.samples;
    expect(value(exp, 'nbd_mirror_site_request_duration_seconds_count', { op: 'trim' }), 'site-wide: every LUN\'s trims').to.equal(64);
    expect(new Set(site.map((x) => x.labels.op)).size).to.equal(7);
    console.log(`      64 LUNs: ${series} series`);
    expect(series).to.be.below(3500);
  });
});
