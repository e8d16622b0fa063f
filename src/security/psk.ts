// Pre-shared key files in GnuTLS psktool's format, which nbd-client, qemu, nbdkit and libnbd
// read too: one "identity:hexkey" per line.
import fs from 'node:fs';
import { checkSecretFile, SecurityError } from './files.js';

/** Shorter keys are refused: 128 bits is the floor for TLS-PSK and for the heartbeat HMAC. */
export const MIN_PSK_BYTES = 16;
const IDENTITY = /^[\x21-\x39\x3b-\x7e]{1,128}$/;   // printable, no ':' or space

export interface PskFile {
  path: string;
  /** Identity → key, in file order. */
  keys: Map<string, Buffer>;
  /** The first entry: what this site presents as a client, and the heartbeat key. */
  first: { identity: string; key: Buffer };
}

export function parsePsk(text: string, path: string): PskFile {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const where = `${path}:${i + 1}`;
    const colon = line.indexOf(':');
    if (colon < 0) throw new SecurityError(`${where}: expected "identity:hexkey"`);
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (!IDENTITY.test(identity)) throw new SecurityError(`${where}: identity must be 1-128 printable characters without ":"`);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new SecurityError(`${where}: key must be hexadecimal`);
    const key = Buffer.from(hex, 'hex');
    if (key.length < MIN_PSK_BYTES) throw new SecurityError(`${where}: key is ${key.length} bytes, at least ${MIN_PSK_BYTES} needed (psktool makes 32)`);
    if (keys.has(identity)) throw new SecurityError(`${where}: identity "${identity}" appears twice`);
    keys.set(identity, key);
  });
  const [entry] = keys;
  if (!entry) throw new SecurityError(`${path}: no "identity:hexkey" line`);
  return { path, keys, first: { identity: entry[0], key: entry[1] } };
}

/** Check permissions, then read and parse. */
export function readPskFile(path: string, what: string): PskFile {
  checkSecretFile(path, what);
  return parsePsk(fs.readFileSync(path, 'utf8'), path);
}
