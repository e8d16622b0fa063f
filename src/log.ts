// winston logger: JSON lines on stdout (journald keeps them), or a readable form on a terminal.
// Logging must never take the site down: when whoever reads stdout goes away (a restarted log
// shipper, `| head`, a closed terminal), writes fail with EPIPE; the line is counted as lost
// (nbd_mirror_log_lines_lost_total) and the site keeps serving.
import winston from 'winston';
import type TransportStream from 'winston-transport';

export type Logger = winston.Logger;

/** winston's formatted line (triple-beam's MESSAGE symbol). */
const MESSAGE = Symbol.for('message');

// winston's runtime export is `Transport` (its type declarations call it `transport`).
const TransportBase = (winston as unknown as { Transport: typeof TransportStream }).Transport;

/** Log lines that could not be written, since the process started (all loggers). */
let lost = 0;

export function logLinesLost(): number {
  return lost;
}

/**
 * Writes each formatted line to one stream, and only counts a line it cannot write: the stream
 * failed (EPIPE...), was closed, or a write reported an error.
 */
export class SafeStreamTransport extends TransportBase {
  private broken = false;

  constructor(private readonly stream: NodeJS.WritableStream & { destroyed?: boolean; writable?: boolean },
    private readonly onBroken: (err: Error) => void = () => undefined) {
    super();
    guardStream(stream);
    stream.on('error', (err: Error) => this.markBroken(err));
  }

  override log(info: Record<string | symbol, unknown>, callback: () => void): void {
    if (this.broken || this.stream.destroyed || this.stream.writable === false) {
      lost++;
    } else {
      try {
        this.stream.write(`${String(info[MESSAGE])}\n`, (err?: Error | null) => {
          if (err) { lost++; this.markBroken(err); }
        });
      } catch (err) {
        lost++;
        this.markBroken(err as Error);
      }
    }
    callback();
  }

  private markBroken(err: Error): void {
    if (this.broken) return;
    this.broken = true;
    this.onBroken(err);
  }
}

const guarded = new WeakSet<object>();

/** An 'error' listener on a stream, so that its errors are never an uncaught exception. */
function guardStream(stream: NodeJS.WritableStream): void {
  if (guarded.has(stream)) return;
  guarded.add(stream);
  stream.on('error', () => undefined);
}

/** stdout and stderr: console.* writes elsewhere in the process must not crash it either. */
export function guardStdio(): void {
  guardStream(process.stdout);
  guardStream(process.stderr);
}

export function createLogger(level: string, format: 'json' | 'pretty' | 'auto', site: string): Logger {
  guardStdio();
  const pretty = format === 'pretty' || (format === 'auto' && process.stdout.isTTY === true);
  const transport = new SafeStreamTransport(process.stdout, (err) => {
    // Say so once where someone may still be looking; stderr may be gone too (then nothing happens).
    try {
      process.stderr.write(`nbd-mirror: stdout failed (${(err as NodeJS.ErrnoException).code ?? err.message}): `
        + 'log lines are lost from now on (counted in nbd_mirror_log_lines_lost_total)\n');
    } catch { /* stderr gone as well */ }
  });
  const logger = winston.createLogger({
    level,
    defaultMeta: { site },
    format: pretty
      ? winston.format.combine(
        winston.format.timestamp({ format: 'HH:mm:ss.SSS' }),
        winston.format.printf(({ timestamp, level: lvl, message, site: s, ...meta }) => {
          const extra = Object.keys(meta).length ? ' ' + JSON.stringify(meta) : '';
          return `${timestamp} ${s} ${lvl}: ${message}${extra}`;
        }),
      )
      : winston.format.combine(winston.format.timestamp(), winston.format.json()),
    transports: [transport],
  });
  // A transport's (or the logger stream's own) error is a lost line, never an uncaught exception.
  logger.on('error', () => { lost++; });
  return logger;
}
