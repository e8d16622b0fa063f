// Helpers to run external commands (the real NBD clients, losetup, mkfs...) from tests.
import { execFile } from 'node:child_process';

export interface ExecResult {
  /** The command line, for error messages. */
  cmd: string;
  stdout: string;
  stderr: string;
  /** Exit code; null when the process was killed by a signal (see `signal`). */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when the process was killed because `timeoutMs` expired. */
  timedOut: boolean;
}

export interface ExecOptions {
  /** Kill the command (SIGKILL) after this many milliseconds. Default 60 s. */
  timeoutMs?: number;
  /** Return the result instead of throwing when the command exits non-zero / is killed. */
  allowFail?: boolean;
  /** Data written to the command's stdin (stdin is closed afterwards). */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export class ExecError extends Error {
  constructor(readonly result: ExecResult) {
    super(
      `command failed (${result.timedOut ? 'timed out' : result.signal ? `signal ${result.signal}` : `exit ${result.code}`}): ` +
        `${result.cmd}\n--- stdout ---\n${tail(result.stdout)}\n--- stderr ---\n${tail(result.stderr)}`,
    );
    this.name = 'ExecError';
  }
}

function tail(s: string, max = 4000): string {
  return s.length > max ? `...${s.slice(-max)}` : s;
}

function quote(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

export function formatCmd(file: string, args: readonly string[]): string {
  return [file, ...args].map(quote).join(' ');
}

/**
 * Run `file args...` (no shell), with a timeout. Resolves with stdout/stderr/code.
 * Throws ExecError on a non-zero exit, a signal or a timeout unless `allowFail` is set.
 */
export function exec(file: string, args: readonly string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
  const cmd = formatCmd(file, args);
  const timeoutMs = opts.timeoutMs ?? 60_000;
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args as string[],
      {
        timeout: timeoutMs,
        killSignal: 'SIGKILL',
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
        env: opts.env ?? process.env,
        cwd: opts.cwd,
      },
      (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: number | string; killed?: boolean; signal?: NodeJS.Signals }) | null;
        if (e && typeof e.code === 'string') {
          // spawn failure (ENOENT...): never a "result", always an error.
          reject(new Error(`cannot run ${cmd}: ${e.message}`));
          return;
        }
        const result: ExecResult = {
          cmd,
          stdout,
          stderr,
          code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
          signal: e?.signal ?? null,
          timedOut: Boolean(e?.killed && e.signal === 'SIGKILL'),
        };
        if (result.code !== 0 && !opts.allowFail) reject(new ExecError(result));
        else resolve(result);
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** Like exec() but never throws for a non-zero exit (still throws if the program can't be started). */
export function execNoThrow(file: string, args: readonly string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
  return exec(file, args, { ...opts, allowFail: true });
}
