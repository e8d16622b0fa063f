// Preparation: the tools, the bench image and the random source file, and the run's metadata.
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CLI_JS, MiB, REPO_ROOT, SETTINGS, log } from './common.js';

/** Preallocate `bytes` with fallocate and fill it with the contents of `fillFrom` (repeated). */
export async function createImage(file, bytes, fillFrom) {
  fs.rmSync(file, { force: true });
  try {
    execFileSync('fallocate', ['-l', String(bytes), file], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    log(`fallocate failed (${String(err.stderr ?? err.message).trim()}), using a sparse file`);
    fs.writeFileSync(file, '');
    fs.truncateSync(file, bytes);
  }
  if (fillFrom) {
    // Write real data once so every server reads allocated blocks and overwrites
    // existing data (otherwise the first server would pay for unwritten extents).
    const fd = fs.openSync(file, 'r+');
    const src = fs.openSync(fillFrom, 'r');
    try {
      const buf = Buffer.allocUnsafe(4 * MiB);
      const srcSize = fs.fstatSync(src).size;
      for (let off = 0; off < bytes; off += buf.length) {
        const n = Math.min(buf.length, bytes - off);
        fs.readSync(src, buf, 0, n, off % srcSize);
        fs.writeSync(fd, buf, 0, n, off);
      }
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(src);
      fs.closeSync(fd);
    }
  }
  return file;
}

export function createRandomFile(file, bytes) {
  const fd = fs.openSync(file, 'w');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (let off = 0; off < bytes; off += buf.length) {
      const n = Math.min(buf.length, bytes - off);
      crypto.randomFillSync(buf, 0, n);
      fs.writeSync(fd, buf, 0, n, off);
    }
  } finally {
    fs.closeSync(fd);
  }
  return file;
}

function toolVersion(cmd, args = ['--version']) {
  try {
    const out = execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
    return out.trim().split('\n')[0];
  } catch (err) {
    const text = `${err.stdout ?? ''}${err.stderr ?? ''}`.trim();
    const line = text.split('\n').find((l) => /version|\d+\.\d+/i.test(l));
    return line ?? null;
  }
}

export function requireTool(cmd) {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${cmd} not found; run: bash scripts/setup.sh nbd-server`);
  }
}

/** The version in the package.json above the nbd-mirror entry point (dist/cli.js → ../package.json). */
function nbdMirrorVersion() {
  try {
    return JSON.parse(fs.readFileSync(path.resolve(path.dirname(CLI_JS), '..', 'package.json'), 'utf8')).version;
  } catch {
    return null;
  }
}

/** The run's metadata (host, tool versions, settings, notes) for the report and the JSON. */
export function buildMeta({ targets, runOutage }) {
  const meta = {
    date: new Date().toISOString(),
    host: os.hostname(),
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? null,
    memGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
    loadavgAtStart: os.loadavg().map((x) => +x.toFixed(2)),
    node: process.version,
    versions: {
      fio: toolVersion('fio'),
      nbdcopy: toolVersion('nbdcopy'),
      nbdkit: toolVersion('nbdkit'),
      'nbd-server': toolVersion('nbd-server', ['-V']),
      'qemu-nbd': toolVersion('qemu-nbd'),
      'nbd-mirror': nbdMirrorVersion(),
    },
    nbdMirrorCli: path.relative(REPO_ROOT, CLI_JS).startsWith('..') ? CLI_JS : path.relative(REPO_ROOT, CLI_JS),
    settings: { ...SETTINGS },
    notes: [
      'All servers use buffered I/O (host page cache, writeback); qemu-nbd runs with --cache=writeback --aio=threads -t -e 16.',
      `nbdkit file plugin with --threads=${SETTINGS.nbdkitThreads}; nbd-server default max_threads (4), flush/fua on.`,
      `fio ioengine=nbd, one connection per job, ${SETTINGS.seconds} s measured after ${SETTINGS.rampSeconds} s ramp; latency = fio total latency (lat_ns).`,
      'nbdcopy with defaults (multi-conn up to 4 connections if advertised), no --flush; MB/s = bytes / wall time.',
      'MB/s = 10^6 bytes/s. Ratios: > 1 means nbd-mirror is better; latency ratios are inverted (reference/nbd-mirror).',
    ],
  };
  if (targets.some((t) => t.name.startsWith('nbd-mirror ')) || runOutage) {
    meta.notes.push('Mirrored targets: two nbd-mirror sites on 127.0.0.1 (a: primary lun0 on the bench image; b: secondary lun0 on a second ' +
      `image of the same size), 4 pool connections, default heartbeat; jobs run against site a once its lun0 is uptodate; ${SETTINGS.mirrorSeconds} s per fio job.`);
  }
  return meta;
}
