// Load and check a site configuration: JSON syntax, the convict schema (strict: unknown keys
// are errors), then what a schema cannot see (duplicate names, backing paths). Every failure
// is one ConfigError line naming the key and the problem.
import fs from 'node:fs';
import convict from 'convict';
import { NbdMirrorError } from '../errors.js';
import { loadHostCredentials, loadMirrorCredentials } from '../security/credentials.js';
import { checkDataDir, checkSecretFile, SecurityError } from '../security/files.js';
import { busyDevices, peerIsSelf, portConflicts, sharedBacking } from './conflicts.js';
import { adminSocketPath, lunChild, lunSchema, schema, type LunConfig, type SiteConfig } from './schema.js';
import { typeProblems } from './types.js';

/** The configuration is invalid (exit 2, shown as a config error). */
export class ConfigError extends NbdMirrorError { override readonly code = 'config'; }

export function siteSchema() {
  return convict<SiteConfig>(schema as unknown as convict.Schema<SiteConfig>);
}

export interface CheckOptions {
  /** Backing paths this process already holds open (a reload): not reported as busy. */
  heldPaths?: ReadonlySet<string>;
  /** false: the schema and the keys only, not the machine (LUN paths, key files, devices): for CLI clients of a running site. */
  machine?: boolean;
}

/** Parse and validate configuration text; `origin` names the file in messages. */
export function parseConfig(text: string, origin: string, env: NodeJS.ProcessEnv = process.env, opts: CheckOptions = {}): SiteConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${origin}: malformed JSON: ${(err as Error).message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new ConfigError(`${origin}: must be a JSON object`);
  }
  const luns = (raw as { luns?: unknown }).luns;
  if (luns !== undefined && !Array.isArray(luns)) {
    throw new ConfigError(`${origin}: luns: must be an array of LUN objects (got ${luns === null ? 'null' : typeof luns})`);
  }
  // JSON types first: convict would coerce a string "no" to true.
  const typeErrors = typeProblems(raw as Record<string, unknown>, schema as unknown as Record<string, unknown>,
    lunSchema as unknown as Record<string, unknown>);
  if (typeErrors.length) throw new ConfigError(`${origin}: ${typeErrors.join('; ')}`);
  const conf = convict<SiteConfig>(schema as unknown as convict.Schema<SiteConfig>, { env, args: [] });
  try {
    conf.load(raw);
    conf.validate({ allowed: 'strict' });
  } catch (err) {
    throw new ConfigError(`${origin}: ${oneLine((err as Error).message)}`);
  }
  const cfg = conf.getProperties();
  if (!cfg.site) throw new ConfigError(`${origin}: site: required (this site's name)`);
  const sock = adminSocketPath(cfg);
  if (Buffer.byteLength(sock) > 107) {
    throw new ConfigError(`${origin}: admin.socket: ${sock} is ${Buffer.byteLength(sock)} bytes, a unix socket path has at most 107; set admin.socket to a shorter path`);
  }
  if (!('mirror' in raw)) cfg.mirror = null;
  else checkMirror(cfg.mirror!, origin);
  cfg.luns = cfg.luns.map((l) => lunChild().load(l).getProperties());
  const machine = opts.machine !== false;
  checkLuns(cfg, origin, machine);
  if (machine) checkSecurity(cfg, origin);
  const clashes = [...portConflicts(cfg), ...peerIsSelf(cfg), ...(machine ? [...sharedBacking(cfg), ...busyDevices(cfg, opts.heldPaths)] : [])];
  if (clashes.length) throw new ConfigError(`${origin}: ${clashes.join('; ')}`);
  return cfg;
}

export function loadConfig(file: string, opts: CheckOptions = {}): SiteConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`${file}: cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return parseConfig(text, file, process.env, opts);
}

function checkMirror(m: NonNullable<SiteConfig['mirror']>, origin: string): void {
  if (m.connections < 1 || m.connections > 64) throw new ConfigError(`${origin}: mirror.connections: must be 1 to 64 (got ${m.connections})`);
  const hb = m.heartbeat;
  if (hb.intervalMs < 10) throw new ConfigError(`${origin}: mirror.heartbeat.intervalMs: must be at least 10`);
  if (hb.timeoutMs <= hb.intervalMs) {
    throw new ConfigError(`${origin}: mirror.heartbeat.timeoutMs: must exceed intervalMs (${hb.timeoutMs} <= ${hb.intervalMs})`);
  }
  const rs = m.journal.regionSize;
  if (rs < 4096 || rs > 64 * 1024 * 1024 || (rs & (rs - 1)) !== 0) {
    throw new ConfigError(`${origin}: mirror.journal.regionSize: must be a power of two from 4096 to 67108864 (got ${rs})`);
  }
  if (m.journal.maxBytes < 1024 * 1024) throw new ConfigError(`${origin}: mirror.journal.maxBytes: must be at least 1 MiB`);
  if (m.syncRateBytes < 1024 * 1024) throw new ConfigError(`${origin}: mirror.syncRateBytes: must be at least 1 MiB per second (got ${m.syncRateBytes})`);
  if (m.asyncWindowBytes < 1024 * 1024) throw new ConfigError(`${origin}: mirror.asyncWindowBytes: must be at least 1 MiB`);
}

function checkLuns(cfg: SiteConfig, origin: string, machine: boolean): void {
  const luns: LunConfig[] = cfg.luns;
  const seen = new Set<string>();
  luns.forEach((lun, i) => {
    const key = `${origin}: luns[${i}]`;
    if (!lun.name) throw new ConfigError(`${key}.name: required`);
    if (!lun.path) throw new ConfigError(`${key}.path: required`);
    if (seen.has(lun.name)) throw new ConfigError(`${key}.name: duplicate LUN name "${lun.name}"`);
    seen.add(lun.name);
    if (lun.role === 'secondary' && lun.mirror !== 'none') {
      throw new ConfigError(`${key}.mirror: a secondary LUN has no mirror mode (got "${lun.mirror}")`);
    }
    if (!cfg.mirror && (lun.role === 'secondary' || lun.mirror !== 'none')) {
      throw new ConfigError(`${key}: ${lun.role === 'secondary' ? 'a secondary LUN' : `mirror "${lun.mirror}"`} needs a "mirror" section (listener and peer)`);
    }
    if (!machine) return;
    let st: fs.Stats;
    try {
      st = fs.statSync(lun.path);
    } catch (err) {
      throw new ConfigError(`${key}.path: ${lun.path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'does not exist' : (err as Error).message}`);
    }
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new ConfigError(`${key}.path: ${lun.path} is neither a regular file nor a block device`);
    }
  });
}

/** admin.tokenFile's token, or null when none is configured. */
export function loadAdminToken(cfg: Pick<SiteConfig, 'admin'>): string | null {
  const file = cfg.admin.tokenFile;
  if (!file) return null;
  checkSecretFile(file, 'admin.tokenFile');
  const token = fs.readFileSync(file, 'utf8').trim();
  if (token.length < 16 || /\s/.test(token)) {
    throw new SecurityError(`admin.tokenFile: ${file}: the token must be one word of at least 16 characters`);
  }
  return token;
}

/** Key files, certificates and dataDir: present, parseable, and not open to other users. */
function checkSecurity(cfg: SiteConfig, origin: string): void {
  try {
    checkDataDir(cfg.dataDir);
    if (cfg.mirror) loadMirrorCredentials(cfg.mirror);
    loadHostCredentials(cfg.listen);
    loadAdminToken(cfg);
  } catch (err) {
    if (err instanceof SecurityError) throw new ConfigError(`${origin}: ${err.message}`);
    throw err;
  }
}

/** convict reports one problem per line, with the offending value; keep it to one readable line. */
function oneLine(message: string): string {
  return message
    .split('\n')
    .filter(Boolean)
    // A LUN's own problem: "luns: [0].path: …: value was [whole array]" → "luns[0].path: …".
    .map((line) => (/^luns: \[\d+\]/.test(line) ? line.replace(/^luns: \[(\d+)\]/, 'luns[$1]').replace(/: value was \[[^]*$/, '') : line))
    .map((line) => line.replace(/: value was (.{60}).+$/, ': value was $1…'))
    .map((line) => line.replace(/^configuration param '([^']+)' not declared in the schema$/, '$1: unknown key'))
    .join('; ');
}
