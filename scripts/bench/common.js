// Settings (from the BENCH_* environment, documented in scripts/bench.js), constants and small
// formatting helpers shared by every bench module.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI_JS = path.resolve(process.env.BENCH_NBD_MIRROR_CLI || path.join(REPO_ROOT, 'dist', 'cli.js'));
export const HOST = '127.0.0.1';
export const EXPORT_NAME = 'lun0';
export const MiB = 1024 * 1024;

function envNumber(name, def, { min = 0 } = {}) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw new Error(`${name} must be a number >= ${min} (got ${JSON.stringify(raw)})`);
  return n;
}

export const SETTINGS = {
  seconds: envNumber('BENCH_SECONDS', 10, { min: 1 }),
  rampSeconds: envNumber('BENCH_RAMP_SECONDS', 1, { min: 0 }),
  sizeMiB: Math.floor(envNumber('BENCH_SIZE_MB', 2048, { min: 16 })),
  copyMiB: 0, // filled below
  nbdkitThreads: Math.floor(envNumber('BENCH_NBDKIT_THREADS', 16, { min: 1 })),
  startTimeoutMs: 30_000,
  stopTimeoutMs: 10_000,
  mirrorSeconds: 0, // filled below
  journalMiB: Math.floor(envNumber('BENCH_JOURNAL_MB', 1024, { min: 1 })),
  outageSeconds: envNumber('BENCH_OUTAGE_SECONDS', 8, { min: 1 }),
  outageRate: process.env.BENCH_OUTAGE_RATE === 'unlimited' ? null : process.env.BENCH_OUTAGE_RATE || '30m',
};
SETTINGS.mirrorSeconds = envNumber('BENCH_MIRROR_SECONDS', SETTINGS.seconds, { min: 1 });
SETTINGS.copyMiB = Math.floor(envNumber('BENCH_COPY_MB', Math.min(1024, SETTINGS.sizeMiB), { min: 1 }));
if (SETTINGS.copyMiB > SETTINGS.sizeMiB) throw new Error('BENCH_COPY_MB must not exceed BENCH_SIZE_MB');

export const OUTPUT_PATH = path.resolve(process.env.BENCH_OUTPUT || 'bench-results.json');

export function log(msg) {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function tail(text, lines = 15) {
  return String(text).trimEnd().split('\n').slice(-lines).join('\n');
}

export function logTail(logPath, lines = 15) {
  try {
    return tail(fs.readFileSync(logPath, 'utf8'), lines);
  } catch {
    return '(no log)';
  }
}

export function fmt(v, digits) {
  if (v === null || v === undefined || !Number.isFinite(v)) return 'n/a';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Write back a file's dirty pages (so background writeback does not land on the next server). */
export function fsyncFile(file) {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A markdown table of string cells, columns padded to their widest cell; column i is
 * left-aligned if left(i), else right-aligned (numbers).
 */
export function markdownTable(header, rows, left = () => true) {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells) => `| ${cells.map((x, i) => (left(i) ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join(' | ')} |`;
  const sep = `|${widths.map((w, i) => (left(i) ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  return [line(header), sep, ...rows.map(line)].join('\n');
}
