// Server handles and the reference NBD servers (nbdkit, nbd-server, qemu-nbd).
//
// A server handle is { name, port, exportName, uri, pid, logPath, stop() }.
import fs from 'node:fs';
import path from 'node:path';
import { EXPORT_NAME, HOST, SETTINGS, logTail, sleep } from './common.js';
import { freePort, waitForPort } from './net.js';
import { isAlive, spawnServer, terminate, tracked } from './proc.js';

export function makeHandle({ name, port, exportName = EXPORT_NAME, pid, logPath, stop }) {
  let stopped = false;
  return {
    name,
    port,
    exportName,
    uri: `nbd://${HOST}:${port}/${exportName}`,
    pid,
    logPath,
    async stop() {
      if (stopped) return;
      stopped = true;
      await stop();
    },
  };
}

/** Start a child-process server and wait for its port. Stops it again if startup fails. */
export async function startProcessServer({ name, cmd, args, port, logPath, cwd, env, onStdoutLine, exportName }) {
  const child = spawnServer(cmd, args, { logPath, cwd, env, description: name, onStdoutLine });
  const stop = async () => {
    await terminate(child.pid);
    await Promise.race([child.exited, sleep(1000)]);
  };
  try {
    const died = child.exited.then(({ code, signal: sig, error }) => {
      throw new Error(error ? `${cmd}: ${error.message}` : `${name} exited during startup (code ${code}, signal ${sig})`);
    });
    died.catch(() => {}); // only matters while racing below
    await Promise.race([
      waitForPort(port, { alive: () => child.exitCode === null && child.signalCode === null && !child.spawnError, what: name }),
      died,
    ]);
  } catch (err) {
    await stop();
    err.message += `\n--- ${name} log ---\n${logTail(logPath)}`;
    throw err;
  }
  return makeHandle({ name, port, exportName, pid: child.pid, logPath, stop });
}

/**
 * A combined handle: clients talk to `front`; stopping it stops front first,
 * then the others (e.g. a mirrored primary and its secondary).
 */
export function combineServers(front, others) {
  return makeHandle({
    name: front.name,
    port: front.port,
    exportName: front.exportName,
    pid: front.pid,
    logPath: front.logPath,
    stop: async () => {
      await front.stop();
      for (const s of others) await s.stop();
    },
  });
}

// --- nbdkit ------------------------------------------------------------------

export async function startNbdkit(ctx) {
  const port = await freePort();
  // file plugin, default cache=default (buffered I/O through the page cache).
  // nbdkit ignores the export name, so nbd://.../lun0 works.
  return startProcessServer({
    name: 'nbdkit',
    cmd: 'nbdkit',
    args: ['--foreground', '--exit-with-parent', '-p', String(port), '-i', HOST,
      `--threads=${SETTINGS.nbdkitThreads}`, 'file', ctx.image],
    port,
    logPath: path.join(ctx.tmpDir, 'nbdkit.log'),
  });
}

// --- nbd-server --------------------------------------------------------------

export async function startNbdServer(ctx) {
  const port = await freePort();
  const conf = path.join(ctx.tmpDir, 'nbd-server.conf');
  const pidFile = path.join(ctx.tmpDir, 'nbd-server.pid');
  const logPath = path.join(ctx.tmpDir, 'nbd-server.log');
  // No user/group: runs as the current user. max_threads left at its default (4).
  // Buffered I/O through the page cache; flush/fua advertised like the others.
  fs.writeFileSync(conf, [
    '[generic]',
    `port = ${port}`,
    `listenaddr = ${HOST}`,
    'allowlist = true',
    `[${EXPORT_NAME}]`,
    `exportname = ${ctx.image}`,
    'flush = true',
    'fua = true',
    '',
  ].join('\n'));
  fs.rmSync(pidFile, { force: true });
  // nbd-server 3.24's -d ("don't fork") serves a single connection and exits,
  // which does not work for nbdinfo + fio + nbdcopy. So it daemonizes; we take
  // its pid from the pid file and stop it by that pid.
  const launcher = spawnServer('nbd-server', ['-C', conf, '-p', pidFile], { logPath, description: 'nbd-server launcher' });
  const { code, signal: sig, error } = await launcher.exited;
  tracked.delete(launcher.pid);
  if (error) throw new Error(`nbd-server: ${error.message}`);
  if (code !== 0) throw new Error(`nbd-server exited with code ${code} signal ${sig}\n${logTail(logPath)}`);
  let pid = 0;
  const deadline = Date.now() + 5000;
  while (!pid && Date.now() < deadline) {
    try {
      pid = Number.parseInt(fs.readFileSync(pidFile, 'utf8').trim(), 10) || 0;
    } catch {
      /* not written yet */
    }
    if (!pid) await sleep(50);
  }
  if (!pid) throw new Error(`nbd-server did not write ${pidFile}\n${logTail(logPath)}`);
  tracked.set(pid, 'nbd-server');
  const stop = () => terminate(pid);
  try {
    await waitForPort(port, { alive: () => isAlive(pid), what: 'nbd-server' });
  } catch (err) {
    await stop();
    throw err;
  }
  return makeHandle({ name: 'nbd-server', port, pid, logPath, stop });
}

// --- qemu-nbd ----------------------------------------------------------------

export async function startQemuNbd(ctx) {
  const port = await freePort();
  // --cache=writeback: buffered I/O through the host page cache with flushes
  // honoured, i.e. the same as nbdkit's file plugin, nbd-server and nbd-mirror
  // (--cache=none would be O_DIRECT and measure the disk instead).
  return startProcessServer({
    name: 'qemu-nbd',
    cmd: 'qemu-nbd',
    args: ['-f', 'raw', '-x', EXPORT_NAME, '-p', String(port), '-b', HOST, '-t', '-e', '16',
      '--cache=writeback', '--aio=threads', ctx.image],
    port,
    logPath: path.join(ctx.tmpDir, 'qemu-nbd.log'),
  });
}
