// What is benchmarked: the targets (table columns, in order), the ratio columns and the
// issue's targets checked below the table. Add entries here to benchmark more setups.
import { SETTINGS } from './common.js';
import { startMirrorPair, startStandalone } from './nbd-mirror.js';
import { startNbdServer, startNbdkit, startQemuNbd } from './servers.js';

/** Name of the outage bench in BENCH_TARGETS (not a fio target, selectable like one). */
export const OUTAGE_NAME = 'outage';
/** Name of the sync bench (sync.js) in BENCH_TARGETS. */
export const SYNC_NAME = 'sync';

// A target: a name, an async start(ctx) returning a server handle (see servers.js and
// nbd-mirror.js), and optionally `seconds` to override BENCH_SECONDS for its fio jobs.
export const TARGETS = [
  { name: 'nbd-mirror', start: startStandalone },
  { name: 'nbdkit', start: startNbdkit },
  { name: 'nbd-server', start: startNbdServer },
  { name: 'qemu-nbd', start: startQemuNbd },
  // Mirrored: two sites (see startMirrorPair), jobs against the primary site a.
  // Default heartbeat settings; `seconds` = measured seconds per fio job.
  {
    name: 'nbd-mirror sync',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror sync', mode: 'sync' }),
  },
  {
    name: 'nbd-mirror async',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror async', mode: 'async' }),
  },
  // The cost of the mirror link's TLS: the sync pair again over plain TCP (mirror.tls "off").
  {
    name: 'nbd-mirror sync plain',
    seconds: SETTINGS.mirrorSeconds,
    start: (ctx) => startMirrorPair(ctx, { name: 'nbd-mirror sync plain', mode: 'sync', tls: 'off' }),
  },
];

// Ratio columns: [ours, reference] (label "ours/reference", oriented so that
// > 1 means ours is better), or an object { label, ours, ref, jobs?, metrics?,
// plain? } limited to some rows (other cells stay empty); plain: true is the
// plain quotient ours/ref without orientation. Entries naming a target that is
// not in TARGETS (or filtered out by BENCH_TARGETS) are dropped.
export const RATIOS = [
  ['nbd-mirror', 'nbdkit'],
  ['nbd-mirror', 'nbd-server'],
  ['nbd-mirror', 'qemu-nbd'],
  ['nbd-mirror sync', 'nbdkit'],
  ['nbd-mirror async', 'nbdkit'],
  // TLS on the mirror link vs plain TCP (< 1: what TLS costs).
  { label: 'sync TLS/plain', ours: 'nbd-mirror sync', ref: 'nbd-mirror sync plain', plain: true },
  // The cost of synchronous mirroring at QD1: sync latency / unmirrored latency (lower is better).
  {
    label: 'sync QD1 latency / nbd-mirror QD1 latency',
    ours: 'nbd-mirror sync',
    ref: 'nbd-mirror',
    jobs: ['randwrite-4k-qd1'],
    metrics: ['latMeanUs', 'latP99Us'],
    plain: true,
  },
];

function normalizeRatio(r) {
  return Array.isArray(r) ? { label: `${r[0]}/${r[1]}`, ours: r[0], ref: r[1] } : r;
}

// Targets of the issue, checked below the table: value = [ours, ref, job, metric]
// quotient (plain, not oriented), compared with `limit`.
export const TARGET_CHECKS = [
  {
    text: 'sync-mirrored 4k randwrite QD16 IOPS >= 0.5x nbdkit (unmirrored)',
    ours: 'nbd-mirror sync', ref: 'nbdkit', job: 'randwrite-4k-qd16', metric: 'iops', op: '>=', limit: 0.5,
  },
  {
    text: 'sync-mirrored 4k randwrite QD1 mean latency <= 2x nbd-mirror unmirrored',
    ours: 'nbd-mirror sync', ref: 'nbd-mirror', job: 'randwrite-4k-qd1', metric: 'latMeanUs', op: '<=', limit: 2,
  },
];

/**
 * The targets BENCH_TARGETS selects (all by default), whether the outage bench runs, and
 * whether the sync bench runs, and the ratio columns whose two targets both run.
 */
export function selectTargets(spec = process.env.BENCH_TARGETS) {
  let targets = TARGETS;
  let runOutage = true;
  let runSync = true;
  if (spec) {
    const wanted = spec.split(',').map((s) => s.trim()).filter(Boolean);
    const unknown = wanted.filter((w) => w !== OUTAGE_NAME && w !== SYNC_NAME && !TARGETS.some((t) => t.name === w));
    if (unknown.length) {
      throw new Error(`unknown BENCH_TARGETS: ${unknown.join(', ')} (known: ${[...TARGETS.map((t) => t.name), OUTAGE_NAME, SYNC_NAME].join(', ')})`);
    }
    targets = TARGETS.filter((t) => wanted.includes(t.name));
    runOutage = wanted.includes(OUTAGE_NAME);
    runSync = wanted.includes(SYNC_NAME);
  }
  const names = new Set(targets.map((t) => t.name));
  const ratios = RATIOS.map(normalizeRatio).filter((r) => names.has(r.ours) && names.has(r.ref));
  return { targets, runOutage, runSync, ratios };
}
