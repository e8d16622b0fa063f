#!/usr/bin/env node
// The table of scripts/bench-compare.sh: per target, job and metric, the median over the
// rounds of the old and of the new revision's bench-results.json, new/old, and a flag on rows
// where new is more than LIMIT (default 5%) worse than old (throughput below 0.95x old,
// latency above old/0.95). Reference servers (nbdkit, nbd-server, qemu-nbd) are the same
// binaries for both revisions: their rows are the noise gauge, never flagged.
//
//   node scripts/bench/compare.js --old A-1.json,A-2.json --new B-1.json,B-2.json \
//        [--old-label main] [--new-label HEAD] [--limit 0.05]
import fs from 'node:fs';
import { markdownTable } from './common.js';

const REFERENCE = new Set(['nbdkit', 'nbd-server', 'qemu-nbd']);

function args(argv) {
  const o = { old: [], new: [], oldLabel: 'old', newLabel: 'new', limit: 0.05 };
  for (let i = 0; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (v === undefined) throw new Error(`${k}: missing value`);
    if (k === '--old' || k === '--new') o[k.slice(2)] = v.split(',').filter(Boolean);
    else if (k === '--old-label') o.oldLabel = v;
    else if (k === '--new-label') o.newLabel = v;
    else if (k === '--limit') o.limit = Number(v);
    else throw new Error(`unknown option ${k}`);
  }
  if (!o.old.length || !o.new.length) throw new Error('need --old and --new result files');
  return o;
}

function load(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    process.stderr.write(`compare: skipping ${file}: ${err.message}\n`);
    return null;
  }
}

/** Map "target\tjobId\tmetric" -> { target, title, label, higherIsBetter, value } for one run. */
function rowsOf(run) {
  const rows = new Map();
  const labels = { iops: 'IOPS', latMeanUs: 'mean lat µs', latP99Us: 'p99 lat µs', MBps: 'MB/s' };
  for (const r of run.table ?? []) {
    for (const [target, value] of Object.entries(r.values)) {
      rows.set(`${target}\t${r.job}\t${r.metric}`, {
        target, title: r.title, label: labels[r.metric] ?? r.metric, higherIsBetter: r.higherIsBetter, value,
      });
    }
  }
  const o = run.outage;
  if (o) {
    rows.set('outage\treplay\tMBps', {
      target: 'outage', title: 'journal replay', label: 'MB/s', higherIsBetter: true, value: o.replay?.MBps ?? null,
    });
    rows.set('outage\tconverge\tseconds', {
      target: 'outage', title: 'converge after outage', label: 's', higherIsBetter: false, value: o.converge?.seconds ?? null,
    });
  }
  return rows;
}

function median(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

/** (max - min) / median of the finite values, or null. */
function spread(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x));
  const m = median(v);
  return v.length > 1 && m ? (Math.max(...v) - Math.min(...v)) / m : null;
}

const num = (v, d) => (v === null || !Number.isFinite(v) ? 'n/a'
  : v.toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d }));
const pct = (v) => (v === null ? '' : `${(v * 100).toFixed(1)}%`);

function main() {
  const o = args(process.argv.slice(2));
  const oldJson = o.old.map(load).filter(Boolean);
  const newJson = o.new.map(load).filter(Boolean);
  const oldRuns = oldJson.map(rowsOf);
  const newRuns = newJson.map(rowsOf);
  const loads = (runs) => runs.map((j) => j.meta?.loadavgAtStart?.[0] ?? '?').join(', ');
  // Grouped by target (in the bench's column order), then the bench's row order.
  const all = [...new Set([...oldRuns, ...newRuns].flatMap((m) => [...m.keys()]))];
  const targets = [...new Set(all.map((k) => k.split('\t')[0]))];
  const keys = targets.flatMap((t) => all.filter((k) => k.split('\t')[0] === t));
  const header = ['target', 'job', 'metric', `${o.oldLabel} median`, `${o.newLabel} median`, 'new/old', 'spread old/new', ''];
  const rows = [];
  const flagged = [];
  let gaugeMax = null;
  for (const key of keys) {
    const info = [...oldRuns, ...newRuns].map((m) => m.get(key)).find(Boolean);
    const ov = oldRuns.map((m) => m.get(key)?.value ?? null);
    const nv = newRuns.map((m) => m.get(key)?.value ?? null);
    const a = median(ov);
    const b = median(nv);
    const q = a !== null && b !== null && a > 0 ? b / a : null;
    // Oriented: > 1 means new is better (latency and seconds inverted).
    const better = q === null || q === 0 ? null : info.higherIsBetter ? q : 1 / q;
    const gauge = REFERENCE.has(info.target);
    let flag = '';
    if (better === null) flag = a === null || b === null ? 'not measured' : '';
    else if (gauge) {
      flag = `gauge ${better >= 1 ? '+' : '-'}${pct(Math.abs(better - 1))}`;
      gaugeMax = Math.max(gaugeMax ?? 0, Math.abs(better - 1));
    } else if (better < 1 - o.limit) {
      flag = `WORSE ${pct(1 - better)}`;
      flagged.push(`${info.target} ${info.title} ${info.label}`);
    }
    const digits = info.label === 'IOPS' ? 0 : info.label === 's' ? 2 : 1;
    rows.push([info.target, info.title, info.label, num(a, digits), num(b, digits), q === null ? 'n/a' : q.toFixed(3),
      `${pct(spread(ov)) || '-'} / ${pct(spread(nv)) || '-'}`, flag]);
  }
  const out = [
    '',
    `## bench compare: ${o.oldLabel} vs ${o.newLabel} (${oldRuns.length} + ${newRuns.length} runs, medians)`,
    '',
    'new/old is the plain quotient; WORSE marks rows where new is more than ' +
      `${pct(o.limit)} worse than old (throughput below ${(1 - o.limit).toFixed(2)}x, latency/seconds above old/${(1 - o.limit).toFixed(2)}).`,
    'spread = (max - min) / median over the runs of each side. Reference servers are the same for both: their rows',
    '(gauge ±x%, oriented like the flags) show the noise of this sitting.',
    '',
    markdownTable(header, rows, (i) => i < 3 || i === 7),
    '',
    `1-min load average at the start of each run (${oldJson[0]?.meta?.cpus ?? '?'} CPUs): old ${loads(oldJson)}; new ${loads(newJson)}.`,
    gaugeMax !== null ? `noise gauge: reference rows differ by up to ${pct(gaugeMax)} between the two sides.` : 'noise gauge: no reference target ran.',
    flagged.length ? `${flagged.length} of ${rows.length} rows more than ${pct(o.limit)} worse (marked WORSE); judge them against the gauge.`
      : `no row more than ${pct(o.limit)} worse.`,
    '',
  ];
  process.stdout.write(out.join('\n'));
}

try {
  main();
} catch (err) {
  process.stderr.write(`compare: ${err.message}\n`);
  process.exit(2);
}
