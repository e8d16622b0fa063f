// Start/stop a real nbd-mirror site (`node dist/cli.js serve --config FILE`) for integration tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './ports.js';
import { tmpDir, type TmpDir } from './tmp.js';

export { freePort, freePorts } from './ports.js';
export { tmpDir, Cleanup, sparseFile, randomFile, sha256File, readAt, pollUntil, pathExists } from './tmp.js';
export { exec, execNoThrow, ExecError, type ExecResult, type ExecOptions } from './exec.js';

/** The key every test site shares for its mirror link and heartbeats (psktool format). */
export const TEST_MIRROR_PSK_LINE = `nbd-mirror-test:${'5e'.repeat(32)}\n`;

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * The server entry point. NBD_MIRROR_CLI overrides it (e.g. to run the suite against an
 * installed build); by default it is the repository's own build output.
 */
export function cliPath(): string {
  return process.env.NBD_MIRROR_CLI ?? path.join(REPO_ROOT, 'dist', 'cli.js');
}

export interface LunConfig {
  name: string;
  /** Existing regular file or block device; the export size is its size. */
  path: string;
  role: string;
  mirror: string;
  readOnly?: boolean;
  [key: string]: unknown;
}

/** listen.tls and listen.credentials, written to the config file as given. */
export interface ListenTlsInput {
  tls?: 'off' | 'allow' | 'require';
  credentials?: { pskFile?: string; certFile?: string; keyFile?: string; caFile?: string };
}

export interface SiteConfig {
  site: string;
  listen: { host: string; port: number } & ListenTlsInput;
  dataDir: string;
  admin: { host: string; port: number; socket?: string; tokenFile?: string };
  luns: LunConfig[];
  log: { level: string };
  [key: string]: unknown;
}

/** Everything but `luns` may be omitted: ports default to free ports, dataDir to a temp dir. */
export interface SiteConfigInput {
  site?: string;
  listen?: { host?: string; port?: number } & ListenTlsInput;
  dataDir?: string;
  admin?: { host?: string; port?: number; socket?: string; tokenFile?: string };
  luns: LunConfig[];
  log?: { level: string };
  /** Passed through to the config file unchanged. */
  [key: string]: unknown;
}

export interface StartSiteOptions {
  /** How long to wait for the "ready" log line. Default 20 s. */
  readyTimeoutMs?: number;
  /** Grace period between SIGTERM and SIGKILL in stop(). Default 5 s. */
  stopGraceMs?: number;
  env?: NodeJS.ProcessEnv;
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface Site {
  proc: ChildProcess;
  config: SiteConfig;
  host: string;
  port: number;
  adminPort: number;
  /** The admin unix socket (operator actions need it: POST over TCP is refused). */
  adminSocket: string;
  /** Temp dir holding config.json (and dataDir unless one was given). */
  dir: TmpDir;
  configPath: string;
  /** stdout lines (JSON log lines), in order. */
  logs: string[];
  /** stderr lines. */
  stderr: string[];
  /** Resolves when the process has exited. */
  exited: Promise<ExitInfo>;
  /** Exit status once exited, else null. */
  exitInfo(): ExitInfo | null;
  isAlive(): boolean;
  /** nbd:// URI for an export (omit for the default export). */
  uri(exportName?: string): string;
  /** SIGTERM, wait for exit, SIGKILL after the grace period; removes the temp dir. Idempotent. */
  stop(): Promise<ExitInfo>;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Last resort if mocha dies before the after() hooks ran: don't leave servers behind.
  process.on('exit', () => {
    for (const p of live) {
      try {
        p.kill('SIGKILL');
      } catch {
        /* already gone */
      }
    }
  });
}

function lastLines(lines: string[], n = 40): string {
  return lines.slice(-n).join('\n');
}

function isReadyLine(line: string): boolean {
  if (!line.startsWith('{')) return false;
  try {
    const obj = JSON.parse(line) as { msg?: unknown; message?: unknown };
    // The brief says "msg"; winston's JSON format calls the field "message". Accept both.
    return obj.msg === 'ready' || obj.message === 'ready';
  } catch {
    return false;
  }
}

/** Split a stream into lines, calling `onLine` for each complete line. */
function lineReader(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  let buf = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    buf += chunk;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      onLine(buf.slice(0, nl).replace(/\r$/, ''));
      buf = buf.slice(nl + 1);
    }
  });
  stream.on('end', () => {
    if (buf.length > 0) onLine(buf);
    buf = '';
  });
}

/**
 * Write `config` to a temp dir, spawn `node dist/cli.js serve --config FILE` and wait for the
 * "ready" log line. Rejects (after killing the process) on early exit or timeout, with the
 * process's stderr/stdout in the message.
 */
export async function startSite(input: SiteConfigInput, opts: StartSiteOptions = {}): Promise<Site> {
  const cli = cliPath();
  if (!existsSync(cli)) {
    throw new Error(`server entry point ${cli} does not exist: run \`npm run build\` first (or set NBD_MIRROR_CLI)`);
  }
  installExitHook();

  const dir = await tmpDir('nbd-mirror-site-');
  try {
    const host = input.listen?.host ?? '127.0.0.1';
    const adminHost = input.admin?.host ?? '127.0.0.1';
    let port = input.listen?.port ?? 0;
    if (port === 0) port = await freePort(host);
    let adminPort = input.admin?.port ?? 0;
    while (adminPort === 0 || adminPort === port) adminPort = await freePort(adminHost);
    const dataDir = input.dataDir ?? dir.join('data');
    await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });

    const config: SiteConfig = {
      ...input,
      site: input.site ?? 'a',
      listen: { ...input.listen, host, port },
      dataDir,
      admin: { ...input.admin, host: adminHost, port: adminPort },
      luns: input.luns,
      log: input.log ?? { level: 'info' },
    };
    // Mirrored sites run the default, secure link (TLS-PSK) unless a test picks another mode;
    // every secure mode shares the test key (it also signs the heartbeats) unless a test names one.
    const mirror = config.mirror as { tls?: string; credentials?: Record<string, string> } | undefined;
    if (mirror && mirror.tls !== 'off' && !mirror.credentials?.pskFile) {
      const pskFile = dir.join('mirror.psk');
      await fs.writeFile(pskFile, TEST_MIRROR_PSK_LINE, { mode: 0o600 });
      config.mirror = { ...mirror, tls: mirror.tls ?? 'psk', credentials: { ...mirror.credentials, pskFile } };
    }
    const configPath = dir.join('config.json');
    await fs.writeFile(configPath, JSON.stringify(config, null, 2));

    const proc = spawn(process.execPath, [cli, 'serve', '--config', configPath], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: opts.env ?? process.env,
      cwd: REPO_ROOT,
    });
    live.add(proc);

    const logs: string[] = [];
    const stderr: string[] = [];
    let exitInfo: ExitInfo | null = null;
    const exited = new Promise<ExitInfo>((resolve) => {
      proc.once('exit', (code, signal) => {
        exitInfo = { code, signal };
        live.delete(proc);
        resolve(exitInfo);
      });
      // A failed spawn emits 'error' and possibly no 'exit'.
      proc.once('error', () => {
        if (proc.pid === undefined && exitInfo === null) {
          exitInfo = { code: null, signal: null };
          live.delete(proc);
          resolve(exitInfo);
        }
      });
    });

    const ready = new Promise<void>((resolve, reject) => {
      const timeoutMs = opts.readyTimeoutMs ?? 20_000;
      const timer = setTimeout(() => {
        reject(
          new Error(
            `site did not log "ready" within ${timeoutMs} ms\n--- stderr ---\n${lastLines(stderr)}\n--- stdout ---\n${lastLines(logs)}`,
          ),
        );
      }, timeoutMs);
      lineReader(proc.stdout!, (line) => {
        logs.push(line);
        if (isReadyLine(line)) {
          clearTimeout(timer);
          resolve();
        }
      });
      lineReader(proc.stderr!, (line) => stderr.push(line));
      proc.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`cannot spawn ${cli}: ${err.message}`));
      });
      void exited.then(({ code, signal }) => {
        clearTimeout(timer);
        // Let the pipes drain so the error message carries the whole stderr.
        setImmediate(() =>
          reject(
            new Error(
              `site exited before "ready" (code ${code}, signal ${signal})\n--- stderr ---\n${lastLines(stderr)}\n--- stdout ---\n${lastLines(logs)}`,
            ),
          ),
        );
      });
    });

    let stopping: Promise<ExitInfo> | null = null;
    const graceMs = opts.stopGraceMs ?? 5_000;
    const site: Site = {
      proc,
      config,
      host,
      port,
      adminPort,
      adminSocket: config.admin.socket || path.join(dataDir, 'admin.sock'),
      dir,
      configPath,
      logs,
      stderr,
      exited,
      exitInfo: () => exitInfo,
      isAlive: () => exitInfo === null,
      uri: (exportName?: string) => `nbd://${host}:${port}${exportName === undefined ? '' : `/${exportName}`}`,
      stop: () => {
        stopping ??= (async () => {
          if (exitInfo === null) {
            proc.kill('SIGTERM');
            let timer: NodeJS.Timeout | undefined;
            const killed = await Promise.race([
              exited.then(() => false),
              new Promise<boolean>((resolve) => {
                timer = setTimeout(() => resolve(true), graceMs);
              }),
            ]);
            clearTimeout(timer);
            if (killed) proc.kill('SIGKILL');
          }
          const info = await exited;
          await dir.cleanup();
          return info;
        })();
        return stopping;
      },
    };

    try {
      await ready;
    } catch (err) {
      await site.stop().catch(() => undefined);
      throw err;
    }
    return site;
  } catch (err) {
    await dir.cleanup().catch(() => undefined);
    throw err;
  }
}
