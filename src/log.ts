// winston logger: JSON lines on stdout (journald keeps them), or a readable form on a terminal.
import winston from 'winston';

export type Logger = winston.Logger;

export function createLogger(level: string, format: 'json' | 'pretty' | 'auto', site: string): Logger {
  const pretty = format === 'pretty' || (format === 'auto' && process.stdout.isTTY === true);
  return winston.createLogger({
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
    transports: [new winston.transports.Console()],
  });
}
