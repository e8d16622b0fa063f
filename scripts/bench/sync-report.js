// The outage/sync table: every bulk-mirror row of issue 13 with its target, from the sync bench
// (sync.js), the outage bench (replay) and the fio targets (1M seq write, mirrored and not).
import { fmt, markdownTable } from './common.js';

const SEQ = 'seqwrite-1m-qd4';

function seqMBps(results, name) {
  const v = results.find((x) => x.name === name)?.jobs?.[SEQ]?.MBps;
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

const verdict = (ok) => (ok === null ? 'n/a' : ok ? 'met' : 'not met');
const quotient = (a, b) => (a !== null && a !== undefined && b ? a / b : null);

/** Rows [measurement, value, reference, ratio, target, result]; rows whose inputs did not run are left out. */
export function syncRows({ sync, outage, results }) {
  const rows = [];
  const unmirrored = seqMBps(results, 'nbd-mirror');
  const add = (what, value, ref, q, target, ok) => rows.push([what, value, ref, q === null ? 'n/a' : `${fmt(q, 2)}x`, target, verdict(ok)]);
  const row = (id) => sync?.rows.find((r) => r.id === id);
  const failed = (r) => (r?.error ? `failed: ${r.error}` : null);
  const init = row('initial-sync');
  if (init) {
    const q = quotient(init.MBps, unmirrored);
    add(init.title, failed(init) ?? `${fmt(init.MBps, 1)} MB/s (${fmt(init.workSeconds, 1)} s; ${fmt(init.seconds, 1)} s from start)`,
      `unmirrored 1M seq ${fmt(unmirrored, 1)} MB/s`, q, '>= 0.7x', q === null ? null : q >= 0.7);
  }
  const cmp = row('full-compare');
  if (cmp) {
    const q = quotient(cmp.MBps, sync.hashMBps);
    add(cmp.title, failed(cmp) ?? `${fmt(cmp.MBps, 1)} MB/s (${fmt(cmp.workSeconds, 1)} s; ${fmt(cmp.seconds, 1)} s from start)`,
      `one-core SHA-256 ${fmt(sync.hashMBps, 0)} MB/s`, q, '>= 0.7x', q === null ? null : q >= 0.7);
  }
  const sparse = row('sparse-64g');
  if (sparse) add(sparse.title, failed(sparse) ?? `${fmt(sparse.seconds, 2)} s to uptodate`, '', null, '<= 5 s', sparse.error ? false : sparse.seconds <= 5);
  const rp = outage?.replay;
  if (rp) {
    const q = quotient(rp.MBps, rp.writeMBps);
    add('journal replay', `${fmt(rp.MBps, 1)} MB/s`, `journal written at ${fmt(rp.writeMBps, 1)} MB/s`, q,
      '>= 1.0x and >= 500 MB/s', q === null ? null : q >= 1 && rp.MBps >= 500);
  }
  for (const [name, limit] of [['nbd-mirror sync', 0.6], ['nbd-mirror async', 0.8]]) {
    const v = seqMBps(results, name);
    if (v === null) continue;
    const q = quotient(v, unmirrored);
    add(`${name.replace('nbd-mirror ', '')}-mirrored 1M seq write QD4`, `${fmt(v, 1)} MB/s`, `unmirrored ${fmt(unmirrored, 1)} MB/s`, q,
      `>= ${limit}x`, q === null ? null : q >= limit);
  }
  const host = row('host-during-sync');
  if (host) {
    add(host.title, failed(host) ?? `${fmt(host.duringIops, 0)} IOPS`, `once uptodate ${fmt(host.withoutIops, 0)} IOPS`, host.ratio ?? null,
      '>= 0.7x', host.ratio === undefined ? null : host.ratio >= 0.7);
  }
  return rows;
}

export function syncTable(input) {
  const rows = syncRows(input);
  if (rows.length === 0) return null;
  const header = ['measurement', 'value', 'reference (same run)', 'ratio', 'target', 'result'];
  return markdownTable(header, rows);
}
