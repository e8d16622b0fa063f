// Which site's admin endpoint a command asks, and what to say when it cannot be reached.
import fs from 'node:fs';
import { describeTarget, parseAdminAddress, type AdminTarget } from '../admin/client.js';
import { exitCodeOf } from '../errors.js';
import { UsageError } from './options.js';

/** --admin HOST:PORT or SOCKET. */
export function adminTarget(text: string, help: string): AdminTarget {
  const t = parseAdminAddress(text);
  if (!t) throw new UsageError(`--admin takes HOST:PORT or the path of the admin socket (got "${text}")\n\n${help}`);
  return t;
}

/** The token of --token-file. */
export function readToken(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new UsageError(`--token-file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Say that `who` could not be reached at `target`; the exit code (3). */
export function notReachable(who: string, target: AdminTarget, err: Error): number {
  console.error(`nbd-mirror: ${who} not reachable at ${describeTarget(target)}: ${reachMessage(err)}`);
  return exitCodeOf(err);
}

/** A connect failure, with what to do about a socket the user may not open. */
function reachMessage(err: Error): string {
  return /EACCES/.test(err.message)
    ? `${err.message} (the admin socket is for the site's user only: run as that user, e.g. root)`
    : err.message;
}
