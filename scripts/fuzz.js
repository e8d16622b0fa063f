#!/usr/bin/env node
// Long fuzz run over every parser that takes untrusted input (test/fuzz/*.test.ts).
//
//   npm run fuzz                              20 s per target, fixed seed
//   npm run fuzz -- --seconds 300             time budget per target
//   npm run fuzz -- --runs 200000             number of inputs per target (no time limit)
//   npm run fuzz -- --seed 1234 --grep journal
//   npm run fuzz -- --tolerate-known          do not check the known, reported bugs
//                                             (test/fuzz/regressions.test.ts), to explore past them
//   FUZZ_SECONDS=300 FUZZ_SEED=$RANDOM npm run fuzz    (the same, through the environment)
//
// `npm test` runs the same targets with small fixed budgets. Here each target prints
// "fuzz: <target>: N inputs, seed S" as it finishes, and a summary follows: inputs executed,
// seed, time and, for a failure, the shrunk counterexample and how to replay it. The regression
// tests (test/fuzz/regressions.test.ts) are left to `npm test`.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const env = { ...process.env };
let grep = null;

function usage(code) {
  console.log('usage: npm run fuzz -- [--seconds N] [--runs N] [--seed S] [--grep PATTERN] [--tolerate-known]');
  process.exit(code);
}

for (let i = 0; i < args.length; i++) {
  const a = args[i];
  const value = () => {
    const v = args[++i];
    if (v === undefined) usage(2);
    return v;
  };
  if (a === '--seconds') env.FUZZ_SECONDS = value();
  else if (a === '--runs') env.FUZZ_RUNS = value();
  else if (a === '--seed') env.FUZZ_SEED = value();
  else if (a === '--grep') grep = value();
  else if (a === '--tolerate-known') env.FUZZ_TOLERATE_KNOWN = '1';
  else if (a === '-h' || a === '--help') usage(0);
  else usage(2);
}
if (!env.FUZZ_SECONDS && !env.FUZZ_RUNS) env.FUZZ_SECONDS = '20';

const dir = path.join(root, 'test', 'fuzz');
const files = fs.readdirSync(dir)
  .filter((f) => f.endsWith('.test.ts') && f !== 'regressions.test.ts')
  .sort()
  .map((f) => path.join('test', 'fuzz', f));

const reportDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fuzz-report-'));
const report = path.join(reportDir, 'report.jsonl');
env.FUZZ_REPORT = report;

console.log(`fuzz: ${files.length} files, ${env.FUZZ_RUNS ? `${env.FUZZ_RUNS} inputs` : ''}${env.FUZZ_RUNS && env.FUZZ_SECONDS ? ' or ' : ''}${env.FUZZ_SECONDS ? `${env.FUZZ_SECONDS} s` : ''} per target, seed ${env.FUZZ_SEED ?? 'default'}`);
const mocha = path.join(root, 'node_modules', 'mocha', 'bin', 'mocha.js');
const mochaArgs = [mocha, '--no-config', '--node-option', 'import=tsx', '--timeout', '0', '--reporter', 'spec'];
if (grep) mochaArgs.push('--grep', grep);
const started = Date.now();
const res = spawnSync(process.execPath, [...mochaArgs, ...files], { cwd: root, env, stdio: 'inherit' });

let rows = [];
try {
  rows = fs.readFileSync(report, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
} catch {
  // no target finished
}
fs.rmSync(reportDir, { recursive: true, force: true });

console.log('\nfuzz summary');
const width = Math.max(6, ...rows.map((r) => r.target.length));
console.log(`  ${'target'.padEnd(width)}  ${'inputs'.padStart(10)}  ${'seed'.padStart(10)}  ${'time'.padStart(8)}  result`);
let total = 0;
for (const r of rows) {
  total += r.inputs;
  console.log(`  ${r.target.padEnd(width)}  ${String(r.inputs).padStart(10)}  ${String(r.seed).padStart(10)}  ${(r.ms / 1000).toFixed(1).padStart(7)}s  ${r.failed ? 'FAILED' : 'ok'}`);
}
console.log(`  ${'total'.padEnd(width)}  ${String(total).padStart(10)}  ${''.padStart(10)}  ${((Date.now() - started) / 1000).toFixed(1).padStart(7)}s`);
for (const r of rows.filter((x) => x.failed)) {
  console.log(`\nFAILED ${r.target} (seed ${r.seed}, ${r.shrinks} shrinks)`);
  console.log(`  counterexample: ${r.counterexample}`);
  console.log(`  error: ${r.error}`);
  console.log(`  replay: FUZZ_SEED=${r.seed} and fc.assert(..., { seed: ${r.seed}, path: "${r.path}" })`);
}
if (res.error) {
  console.error(`fuzz: could not run mocha: ${res.error.message}`);
  process.exit(1);
}
process.exit(res.status ?? 1);
