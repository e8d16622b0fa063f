// Client side of the admin endpoint, for `nbd-mirror status` and the operator actions
// (`nbd-mirror promote|demote|resolve|verify`).
import http from 'node:http';
import { NbdMirrorError } from '../errors.js';
import type { RoleChange, VerifyReport } from './actions.js';

/**
 * Where the admin endpoint is: its TCP address (reads open; actions need `token`), or its unix
 * socket (everything, for whoever may open it).
 */
export type AdminTarget = { host: string; port: number; token?: string | null } | { socketPath: string };

/** "HOST:PORT", "[V6]:PORT", or a socket path (contains a "/"). */
export function parseAdminAddress(text: string): AdminTarget | null {
  if (text.includes('/')) return { socketPath: text };
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(text);
  if (!m || Number(m[3]) > 65535) return null;
  return { host: m[1] ?? m[2], port: Number(m[3]) };
}

export function describeTarget(t: AdminTarget): string {
  return 'socketPath' in t ? t.socketPath : `${t.host.includes(':') ? `[${t.host}]` : t.host}:${t.port}`;
}

function connectOptions(t: AdminTarget): http.RequestOptions {
  if ('socketPath' in t) return { socketPath: t.socketPath };
  return { host: t.host, port: t.port, headers: t.token ? { authorization: `Bearer ${t.token}` } : {} };
}

/** GET /status; rejects with AdminUnreachableError whatever fails (no status is no status). */
export function fetchStatus(target: AdminTarget, timeoutMs = 5000): Promise<unknown> {
  return new Promise<unknown>((resolve, reject) => {
    const req = http.get({ ...connectOptions(target), path: '/status', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
  }).catch((err: Error) => { throw new AdminUnreachableError(err.message); });
}

interface LunStatus {
  name: string; role: string; mode: string; state: string; reason?: string; size: number; hosts: number;
  counters: { writeOps: number; writeBytes: number; readOps: number };
  protection?: string; etaSeconds?: number | null; catchup?: { done: number; total: number; percent: number } | null;
  journal?: { bytes: number; oldestAgeMs: number | null }; lagBytes?: number;
}
interface SiteStatusBody {
  site: string; luns: LunStatus[];
  process?: { rssBytes: number; heapUsedBytes: number };
  mirror?: { peer: string; link: string; health: string } | null;
}

export const STATUS_HEADER = ['LUN', 'ROLE', 'MODE', 'STATE', 'PROTECTION', 'PROGRESS', 'ETA', 'JOURNAL', 'LAG', 'SIZE', 'HOSTS',
  'WRITES', 'WRITTEN', 'READS', 'REASON'];

/**
 * A readable table of the status JSON: a site line, one row per LUN (empty cells are "-"), and a
 * summary line (LUNs by state, and which are not protected by the peer, with their ETA).
 */
export function formatStatus(body: unknown): string {
  const s = body as SiteStatusBody;
  const rows = [STATUS_HEADER];
  for (const l of s.luns) {
    const journal = l.journal ? `${bytes(l.journal.bytes)}${l.journal.oldestAgeMs != null ? ` (${duration(l.journal.oldestAgeMs / 1000)} old)` : ''}` : '-';
    rows.push([l.name, l.role, l.mode, l.state, l.protection ?? '-', l.catchup ? `${l.catchup.percent}%` : '-',
      l.etaSeconds != null ? duration(l.etaSeconds) : '-', journal, l.lagBytes != null ? bytes(l.lagBytes) : '-',
      bytes(l.size), String(l.hosts), String(l.counters.writeOps), bytes(l.counters.writeBytes), String(l.counters.readOps),
      l.reason || '-']);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  const table = rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd()).join('\n');
  const head = [`site ${s.site}`];
  const facts: string[] = [];
  if (s.mirror) facts.push(`peer ${s.mirror.peer || '?'}, link ${s.mirror.health}`);
  if (s.process) facts.push(`rss ${bytes(s.process.rssBytes)}, heap ${bytes(s.process.heapUsedBytes)}`);
  if (facts.length) head.push(`(${facts.join('; ')})`);
  return `${head.join('  ')}\n${table}\n${statusSummary(s)}`;
}

/** "3 LUNs: 2 uptodate, 1 resyncing; local-only: lun0 (resyncing, ETA 1m05s)". */
export function statusSummary(s: SiteStatusBody): string {
  const byState = new Map<string, number>();
  for (const l of s.luns) byState.set(l.state, (byState.get(l.state) ?? 0) + 1);
  const states = [...byState].map(([st, n]) => `${n} ${st}`).join(', ');
  const local = s.luns.filter((l) => l.protection === 'local-only');
  const primaries = s.luns.filter((l) => l.protection != null);
  const journal = s.luns.reduce((sum, l) => sum + (l.journal?.bytes ?? 0), 0);
  let prot: string;
  if (primaries.length === 0) prot = 'no mirrored primaries here';
  else if (local.length === 0) prot = `every mirrored primary protected by the peer`;
  else prot = `local-only: ${local.map((l) => `${l.name} (${l.state}${l.etaSeconds != null ? `, ETA ${duration(l.etaSeconds)}` : ''})`).join(', ')}`;
  return `${s.luns.length} LUN${s.luns.length === 1 ? '' : 's'}${states ? `: ${states}` : ''}; ${prot}${journal ? `; journals ${bytes(journal)}` : ''}`;
}

/** 42s, 3m05s, 2h07m. */
export function duration(seconds: number): string {
  const t = Math.max(0, Math.round(seconds));
  if (t < 60) return `${t}s`;
  if (t < 3600) return `${Math.floor(t / 60)}m${String(t % 60).padStart(2, '0')}s`;
  return `${Math.floor(t / 3600)}h${String(Math.floor((t % 3600) / 60)).padStart(2, '0')}m`;
}

function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** The admin endpoint could not be reached (nothing listens, connect timed out...): no action was taken. */
export class AdminUnreachableError extends NbdMirrorError { override readonly code = 'unreachable'; }

/**
 * The request reached the site but no (complete, readable) answer came back: the action may or
 * may not have taken place.
 */
export class AdminAnswerError extends NbdMirrorError { override readonly code = 'no-answer'; }

export interface ActionAnswer { status: number; body: unknown }

/**
 * POST /luns/LUN/ACTION?query to the admin endpoint; resolves with the HTTP status and the parsed
 * JSON body, whatever the status. `timeoutMs` bounds the wait for the answer; 0 waits as long as
 * it takes (verify). Rejects with AdminUnreachableError when no connection could be made, with
 * AdminAnswerError when the connection was made but the answer timed out, broke off or is not JSON.
 */
export function postAction(target: AdminTarget, lun: string, action: string,
  query: Record<string, string> = {}, timeoutMs = 60_000): Promise<ActionAnswer> {
  const qs = new URLSearchParams(query).toString();
  const path = `/luns/${encodeURIComponent(lun)}/${encodeURIComponent(action)}${qs ? `?${qs}` : ''}`;
  return new Promise((resolve, reject) => {
    let connected = false;
    let timer: NodeJS.Timeout | undefined;
    const fail = (err: Error) => {
      clearTimeout(timer);
      reject(connected ? new AdminAnswerError(err.message) : new AdminUnreachableError(err.message));
    };
    // agent: false — a fresh connection without the global agent's keep-alive socket timeout,
    // so a long verify is only bounded by `timeoutMs`.
    const base = connectOptions(target);
    const req = http.request({ ...base, path, method: 'POST', agent: false, headers: { ...base.headers, 'content-length': 0 } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', fail);
      res.on('aborted', () => fail(new Error('the answer broke off')));
      res.on('end', () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) });
        } catch {
          reject(new AdminAnswerError(`HTTP ${res.statusCode}: not a JSON answer: ${text.slice(0, 200)}`));
        }
      });
    });
    req.on('socket', (socket) => {
      if (!socket.connecting) connected = true;
      else socket.once('connect', () => { connected = true; });
    });
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        req.destroy(new Error(connected ? `no answer within ${timeoutMs / 1000} s` : `connect timed out after ${timeoutMs / 1000} s`));
      }, timeoutMs);
    }
    req.on('error', fail);
    req.end();
  });
}

const EXPECTED_ROLE: Record<string, string> = { promote: 'primary', demote: 'secondary' };

/** One line for a promote/demote/resolve answer, e.g. "lun0: promoted to primary (note; note)". */
export function formatRoleChange(action: 'promote' | 'demote' | 'resolve', body: unknown,
  opts: { discard?: 'local' | 'remote' } = {}): string {
  const r = body as RoleChange;
  let line: string;
  if (action === 'resolve') {
    line = `${r.lun}: split brain resolved, ${opts.discard ? `${opts.discard} changes discarded` : 'changes discarded'}; now ${r.role}`;
  } else {
    line = r.role === EXPECTED_ROLE[action]
      ? `${r.lun}: ${action === 'promote' ? 'promoted' : 'demoted'} to ${r.role}`
      : `${r.lun}: ${action} done; now ${r.role}`;
  }
  const notes = Array.isArray(r.notes) ? r.notes.filter((n) => typeof n === 'string' && n.length > 0) : [];
  return notes.length ? `${line} (${notes.join('; ')})` : line;
}

/** True when the report leaves copies that (still) differ: differences found and not all repaired. */
export function verifyLeftDifferences(report: VerifyReport, repair: boolean): boolean {
  const n = report.differing.length;
  return n > 0 && (!repair || report.repaired < n);
}

/**
 * One line for a verify report: "lun0: 256.0 MiB compared, copies are identical", or
 * "lun0: 256.0 MiB compared, 1 region differs (offset 1048576, 65536 bytes); repaired".
 */
export function formatVerify(body: unknown, repair: boolean): string {
  const r = body as VerifyReport;
  const head = `${r.lun}: ${bytes(r.bytes)} compared`;
  const d = r.differing;
  if (d.length === 0) return `${head}, copies are identical`;
  const total = d.reduce((sum, x) => sum + x.length, 0);
  const where = d.length <= 3
    ? d.map((x) => `offset ${x.offset}, ${x.length} bytes`).join('; ')
    : `${total} bytes in all, first at offset ${d[0].offset}; --json lists them`;
  const diff = `${d.length} region${d.length === 1 ? ' differs' : 's differ'} (${where})`;
  let outcome: string;
  if (!repair) outcome = 'not repaired (run again with --repair to resend them from the primary)';
  else if (r.repaired >= d.length) outcome = 'repaired';
  else outcome = `only ${r.repaired} of ${d.length} repaired`;
  return `${head}, ${diff}; ${outcome}`;
}
