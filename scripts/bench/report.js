// The report: the markdown table with its ratio columns, the issue's target checks, the
// outage table, the text on stdout and bench-results.json.
import fs from 'node:fs';
import path from 'node:path';
import { MiB, OUTPUT_PATH, SETTINGS, fmt, markdownTable } from './common.js';
import { JOBS, METRICS } from './jobs.js';
import { OUTAGE_CONVERGE_SLACK_S, OUTAGE_TARGET_REPLAY_MBPS } from './outage.js';
import { syncTable } from './sync-report.js';
import { TARGET_CHECKS } from './targets.js';

function metricValue(results, targetName, jobId, metric) {
  const r = results.find((x) => x.name === targetName);
  const v = r?.jobs?.[jobId]?.[metric];
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

/** Ratio oriented so that > 1 means `ours` is better (inverted for latency). */
function ratio(ours, ref, higherIsBetter) {
  if (ours === null || ref === null || ours <= 0 || ref <= 0) return null;
  return higherIsBetter ? ours / ref : ref / ours;
}

function buildTable(results, ratios) {
  const names = results.map((r) => r.name);
  const header = ['job', 'metric', ...names, ...ratios.map((r) => r.label)];
  const rows = [];
  const data = [];
  for (const job of JOBS) {
    for (const m of job.metrics) {
      const def = METRICS[m];
      const vals = names.map((n) => metricValue(results, n, job.id, m));
      const applies = ratios.map((r) => (!r.jobs || r.jobs.includes(job.id)) && (!r.metrics || r.metrics.includes(m)));
      const rs = ratios.map((r, i) => (applies[i]
        ? ratio(metricValue(results, r.ours, job.id, m), metricValue(results, r.ref, job.id, m), r.plain ? true : def.higherIsBetter)
        : null));
      rows.push([job.title, def.label + (def.higherIsBetter ? '' : ' (ratio inverted)'), ...vals.map((v) => fmt(v, def.digits)),
        ...rs.map((r, i) => (applies[i] ? fmt(r, 2) : ''))]);
      data.push({
        job: job.id,
        title: job.title,
        metric: m,
        higherIsBetter: def.higherIsBetter,
        values: Object.fromEntries(names.map((n, i) => [n, vals[i]])),
        ratios: Object.fromEntries(ratios.flatMap((r, i) => (applies[i] ? [[r.label, rs[i]]] : []))),
      });
    }
  }
  return { markdown: markdownTable(header, rows, (i) => i < 2), data };
}

/** The issue's targets that can be judged with the targets run (ours present). */
function checkTargets(results) {
  const ran = new Set(results.map((r) => r.name));
  return TARGET_CHECKS.filter((c) => ran.has(c.ours)).map((c) => {
    const a = metricValue(results, c.ours, c.job, c.metric);
    const b = metricValue(results, c.ref, c.job, c.metric);
    const value = a !== null && b !== null && b > 0 ? a / b : null;
    const met = value === null ? null : c.op === '>=' ? value >= c.limit : value <= c.limit;
    const verdict = met === null ? `not measured (needs "${c.ours}" and "${c.ref}" in BENCH_TARGETS)` : `${met ? 'met' : 'not met'} (${fmt(value, 2)}x)`;
    return { ...c, value, met, line: `target: ${c.text}: ${verdict}` };
  });
}

function outageTable(o) {
  const rows = [];
  const r = o.replay;
  if (r) {
    rows.push([
      `journal replay (${fmt((r.journal?.bytes ?? 0) / MiB, 0)} MiB journal, async)`,
      r.MBps !== null && r.MBps !== undefined ? `${fmt(r.MBps, 1)} MB/s (${fmt(r.seconds, 2)} s replaying → uptodate)` : 'n/a',
      r.target ?? `>= ${OUTAGE_TARGET_REPLAY_MBPS} MB/s`,
      r.met === null || r.met === undefined ? 'n/a' : r.met ? 'met' : 'not met',
    ]);
  }
  const c = o.converge;
  if (c) {
    rows.push([
      `converge after ${c.outageSeconds} s outage under a writer`,
      c.seconds !== null && c.seconds !== undefined ? `${fmt(c.seconds, 2)} s after SIGCONT` : 'not converged',
      c.target ?? '',
      c.seconds === null || c.seconds === undefined ? 'not met' : c.met ? 'met' : 'not met',
    ]);
  }
  const header = ['measurement', 'value', 'target', 'result'];
  const out = [markdownTable(header, rows), ''];
  if (r && r.MBps !== undefined) {
    out.push(`target: journal replay >= ${OUTAGE_TARGET_REPLAY_MBPS} MB/s on loopback: ${r.met === null ? 'n/a' : r.met ? 'met' : 'not met'} (${fmt(r.MBps, 1)} MB/s)`);
    out.push(`  detection ${fmt(r.detectSeconds, 2)} s after SIGSTOP; written at ${fmt(r.writeMBps, 1)} MB/s into the journal; ` +
      `SIGCONT → replaying ${fmt(r.probationSeconds, 2)} s; all records acked after ${fmt(r.sendSeconds, 2)} s of replay` +
      `${r.resyncing ? '; a resync followed' : ''}${r.note ? `; ${r.note}` : ''}`);
  }
  if (c && c.target) {
    out.push(`converged in ${c.seconds !== null ? `${fmt(c.seconds, 2)} s` : 'n/a (not within the timeout)'} (target <= probation + ${OUTAGE_CONVERGE_SLACK_S} s = ${c.limitSeconds} s): ${c.met ? 'met' : 'not met'}`);
    out.push(`  writer ${fmt(c.writerMBps, 1)} MB/s (whole run); max journal during the outage ${fmt((c.maxJournalBytes ?? 0) / MiB, 1)} MiB` +
      (c.replayedBytes !== undefined && c.replaySeconds ? `; replayed ${fmt(c.replayedBytes / MiB, 1)} MiB in ${fmt(c.replaySeconds, 2)} s while the writer ran` : '') +
      `${c.journalCollapsed ? '; the journal overflowed journal.maxBytes during catch-up → collapsed into the bitmap → resync' : c.resyncing ? '; a resync happened' : ''}` +
      `${c.linkDownsAfterResume?.length ? `; ${c.linkDownsAfterResume.length} more link-down(s) after SIGCONT (${c.linkDownsAfterResume.join('; ')})` : ''}` +
      `${c.secondsAfterWriterStopped !== undefined ? `; converged ${fmt(c.secondsAfterWriterStopped, 2)} s after the writer was stopped` : ''}`);
  }
  if (o.error) out.push(`- outage: ${o.status}: ${o.error.split('\n')[0]}`);
  return out.join('\n');
}


/**
 * Print the report on stdout and write the results JSON (BENCH_OUTPUT). `targets` are the
 * selected fio targets, `results` their runTarget results, `outage` the outage result or null.
 */
export function writeReport({ meta, targets, results, ratios, outage, sync, totalSeconds }) {
  const table = buildTable(results, ratios);
  const copyTitle = `nbdcopy = ${SETTINGS.copyMiB} MiB random file → export`;
  const out = [
    '',
    `## nbd-mirror benchmark (${meta.date}, ${meta.cpus} CPUs, load ${meta.loadavgAtStart.join('/')} at start)`,
    '',
    `Image ${SETTINGS.sizeMiB} MiB (preallocated, page cache), fio ${SETTINGS.seconds} s per job; ${copyTitle}.`,
    'Ratio columns "X/Y": X relative to Y, > 1 means X is better',
    '(throughput rows: X/Y; latency rows are inverted: Y/X).',
    ...(ratios.some((r) => r.plain)
      ? [`Plain ratio columns (${ratios.filter((r) => r.plain).map((r) => `"${r.label}"`).join(', ')}): the quotient as named, not inverted (lower latency ratio is better).`]
      : []),
    ...(targets.some((t) => t.seconds !== undefined && t.seconds !== SETTINGS.seconds)
      ? [`Mirrored targets ran ${SETTINGS.mirrorSeconds} s per fio job.`]
      : []),
    '',
    ...(results.length ? [table.markdown, ''] : ['(no fio targets selected)', '']),
  ];
  const checks = checkTargets(results);
  for (const c of checks) out.push(c.line);
  if (checks.length) out.push('');
  if (outage) {
    out.push('### Outage (async mirror, link cut by SIGSTOP of the secondary site)', '', outageTable(outage), '');
  }
  const bulk = syncTable({ sync, outage, results });
  if (bulk) {
    out.push('### Bulk mirror work (sync pairs on fresh dataDirs, rate cap raised; timed to uptodate)', '', bulk, '');
  }
  const failed = results.filter((r) => r.status !== 'ok' || Object.values(r.jobs).some((j) => j.error));
  for (const r of failed) {
    if (r.error) out.push(`- ${r.name}: ${r.status}: ${r.error.split('\n')[0]}`);
    for (const [id, j] of Object.entries(r.jobs)) if (j.error) out.push(`- ${r.name} ${id}: ${j.error.split('\n')[0]}`);
  }
  if (failed.length) out.push('');
  out.push(`Total bench time ${totalSeconds.toFixed(0)} s. Results written to ${path.relative(process.cwd(), OUTPUT_PATH) || OUTPUT_PATH}.`);
  process.stdout.write(out.join('\n') + '\n');

  const json = {
    meta: { ...meta, totalSeconds },
    jobs: JOBS.map(({ id, title, kind, params, metrics }) => ({ id, title, kind, params, metrics })),
    targets: results,
    table: table.data,
    targetChecks: checks.map(({ line, ...c }) => c),
    outage,
    sync,
  };
  fs.writeFileSync(OUTPUT_PATH, JSON.stringify(json, null, 2) + '\n');
}
