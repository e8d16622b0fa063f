// Permission rules for the files a site trusts: secrets nobody else may read or replace, and
// the data directory that holds journals and metadata.
import fs from 'node:fs';
import { NbdMirrorError } from '../errors.js';

/** A key, token or data directory that is unsafe to use: a configuration problem (exit 2). */
export class SecurityError extends NbdMirrorError { override readonly code = 'config'; }

/**
 * A secret (pre-shared key, private key): a regular file neither readable nor writable by
 * "other". A key anyone can read is no secret; one anyone can write lets them pick it.
 */
export function checkSecretFile(path: string, what: string): void {
  const st = statFile(path, what);
  if (st.mode & 0o002) throw new SecurityError(`${what}: ${path} is world-writable; chmod 600 it`);
  if (st.mode & 0o004) throw new SecurityError(`${what}: ${path} is readable by every user; chmod 600 it`);
}

/** A public but trusted file (certificate, CA bundle): not world-writable. */
export function checkTrustedFile(path: string, what: string): void {
  const st = statFile(path, what);
  if (st.mode & 0o002) throw new SecurityError(`${what}: ${path} is world-writable; chmod 644 it`);
}

function statFile(path: string, what: string): fs.Stats {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new SecurityError(`${what}: ${path}: ${code === 'ENOENT' ? 'does not exist' : (err as Error).message}`);
  }
  if (!st.isFile()) throw new SecurityError(`${what}: ${path} is not a regular file`);
  return st;
}

/** An existing data directory must be a directory nobody else can write; null if missing. */
export function checkDataDir(dir: string): fs.Stats | null {
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new SecurityError(`dataDir: ${dir}: ${(err as Error).message}`);
  }
  if (!st.isDirectory()) throw new SecurityError(`dataDir: ${dir} is not a directory`);
  if (st.mode & 0o002) throw new SecurityError(`dataDir: ${dir} is world-writable; it holds journals and metadata (chmod 700 it)`);
  return st;
}

/**
 * The data directory: created 0700; an existing one must not be world-writable (anyone could
 * swap a journal), and is tightened to 0700 if group or others may enter it.
 * Returns the mode it had when it was tightened, for the log.
 */
export function prepareDataDir(dir: string): number | null {
  const st = checkDataDir(dir);
  if (!st) {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    return null;
  }
  if ((st.mode & 0o077) === 0) return null;
  fs.chmodSync(dir, 0o700);
  return st.mode & 0o777;
}
