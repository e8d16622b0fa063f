// Reading the TLS material a config names, once, with the permission rules of files.ts.
// Both `config check` (through load.ts) and a starting site go through here.
import fs from 'node:fs';
import { checkSecretFile, checkTrustedFile, SecurityError } from './files.js';
import { readPskFile, type PskFile } from './psk.js';

/** The TLS files a config section names ('' for none). */
export interface TlsCredentials { pskFile: string; certFile: string; keyFile: string; caFile: string }
export type MirrorTlsMode = 'psk' | 'cert' | 'off';
export type HostTlsMode = 'off' | 'allow' | 'require';

export interface Credentials {
  psk: PskFile | null;
  cert: Buffer | null;
  key: Buffer | null;
  ca: Buffer | null;
}

export function loadCredentials(c: TlsCredentials, prefix: string): Credentials {
  const read = (path: string, key: keyof TlsCredentials, secret: boolean): Buffer | null => {
    if (!path) return null;
    (secret ? checkSecretFile : checkTrustedFile)(path, `${prefix}.${key}`);
    return fs.readFileSync(path);
  };
  const psk = c.pskFile ? readPskFile(c.pskFile, `${prefix}.pskFile`) : null;
  const cert = read(c.certFile, 'certFile', false);
  const key = read(c.keyFile, 'keyFile', true);
  const ca = read(c.caFile, 'caFile', false);
  if (!!cert !== !!key) throw new SecurityError(`${prefix}: certFile and keyFile go together`);
  return { psk, cert, key, ca };
}

/** What each mirror.tls mode needs; the shared key also signs heartbeats, so "cert" needs it too. */
export function loadMirrorCredentials(m: { tls: MirrorTlsMode; credentials: TlsCredentials }): Credentials {
  const creds = loadCredentials(m.credentials, 'mirror.credentials');
  const missing = (what: string) => new SecurityError(`mirror.credentials.${what}: required when mirror.tls is "${m.tls}"`);
  if (m.tls === 'psk' && !creds.psk) throw missing('pskFile');
  if (m.tls === 'cert') {
    if (!creds.cert) throw missing('certFile');
    if (!creds.ca) throw missing('caFile');
    if (!creds.psk) throw new SecurityError('mirror.credentials.pskFile: required when mirror.tls is "cert" (it authenticates the heartbeats)');
  }
  if (creds.psk && creds.psk.keys.size !== 1) {
    throw new SecurityError(`mirror.credentials.pskFile: ${creds.psk.path} must hold exactly one key, the same file at both sites`);
  }
  return creds;
}

/** Host TLS: "allow"/"require" need a PSK file or a certificate. */
export function loadHostCredentials(listen: { tls: HostTlsMode; credentials: TlsCredentials }): Credentials | null {
  if (listen.tls === 'off') return null;
  const creds = loadCredentials(listen.credentials, 'listen.credentials');
  if (!creds.psk && !creds.cert) {
    throw new SecurityError(`listen.credentials: listen.tls "${listen.tls}" needs pskFile, or certFile and keyFile`);
  }
  return creds;
}
