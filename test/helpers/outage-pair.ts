// Two mirrored sites with a FaultProxy in each direction, for outage and crash tests.
//
//   a (primary lun0)  mirror.peer.port -> proxyAB -> b's mirror listener (TCP pool + UDP heartbeats)
//   b (secondary lun0) mirror.peer.port -> proxyBA -> a's mirror listener (UDP heartbeats)
//
// Cutting both proxies is a real link cut: no TCP byte and no heartbeat gets through either way.
// Each site keeps its dataDir and ports across restarts (kill + restart = the same config).
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import { FaultProxy } from './fault-proxy.js';
import { siteStatus } from './pair.js';
import { execNoThrow, freePorts, pollUntil, sha256File, sparseFile, startSite, type Site, type SiteConfigInput } from './site.js';
import type { TmpDir } from './tmp.js';

const MiB = 1024 * 1024;
// python3-libnbd is a Debian package: use the system interpreter, not whatever is first on PATH.
const PYTHON = '/usr/bin/python3';
const FLUSH_SCRIPT = 'import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.flush()\nh.shutdown()\n';

export const SHORT_HEARTBEAT = { intervalMs: 200, timeoutMs: 600, probationMs: 1000 };

export interface PrimaryLunStatus {
  name: string;
  state: string;
  reason: string;
  writePath: 'live' | 'journal' | 'bitmap';
  mode: string;
  inflight: number;
  lagBytes: number;
  counters: { writeOps: number; writeBytes: number; flushOps: number; errors: number };
  mirrored: { ops: number; bytes: number; failures: number; replayed: number; replayedBytes: number; resynced: number };
  journal: { records: number; bytes: number; oldestAgeMs: number | null };
  progress: { replayTotal: number; replayDone: number; resyncTotal: number; resyncDone: number };
  dirtyRegions: number;
  resyncPending: number;
  recovery: null | {
    records: number; bytes: number; tornTailBytes: number;
    corrupt: null | { offset: number; reason: string; savedAs: string };
  };
}

export interface FullStatus {
  site: string;
  mirror: null | { link: string; health: string; peer: string };
  luns: (PrimaryLunStatus & Record<string, unknown>)[];
}

export interface LogLine {
  message: string;
  level: string;
  timestamp: string;
  [key: string]: unknown;
}

export interface OutagePairOptions {
  mode: 'sync' | 'async';
  /** Backing file size (sparse). Default 64 MiB. */
  size?: number;
  /** Extra keys of a's "mirror" section (e.g. journal.maxBytes). */
  mirrorA?: Record<string, unknown>;
  connections?: number;
  /** Both images start with the same random bytes instead of holes (a compare then reads and hashes data). */
  sameData?: boolean;
  /** Random data in a's file only (b stays a hole): a new secondary with everything to copy. */
  dataOnA?: boolean;
}

export class OutagePair {
  private constructor(
    readonly dir: TmpDir,
    public a: Site,
    public b: Site,
    readonly proxyAB: FaultProxy,
    readonly proxyBA: FaultProxy,
    readonly inputs: { a: SiteConfigInput; b: SiteConfigInput },
    readonly files: { a: string; b: string },
    readonly dataDirs: { a: string; b: string },
  ) {}

  /** Every process this pair ever started (restarts included), for the logs. */
  readonly history: { a: Site[]; b: Site[] } = { a: [], b: [] };

  static async start(dir: TmpDir, opts: OutagePairOptions): Promise<OutagePair> {
    const size = opts.size ?? 64 * MiB;
    const files = {
      a: await sparseFile(dir.join('a-lun0.img'), size),
      b: await sparseFile(dir.join('b-lun0.img'), size),
    };
    if (opts.sameData) {
      const data = randomBytes(size);
      await fs.writeFile(files.a, data);
      await fs.writeFile(files.b, data);
    } else if (opts.dataOnA) {
      await fs.writeFile(files.a, randomBytes(size));
    }
    const dataDirs = { a: dir.join('a-data'), b: dir.join('b-data') };
    await fs.mkdir(dataDirs.a, { recursive: true });
    await fs.mkdir(dataDirs.b, { recursive: true });

    const ports = await freePorts(6);
    const [nbdA, admA, mirA, nbdB, admB, mirB] = ports;
    const proxies: FaultProxy[] = [];
    try {
      // A proxy port must not be one of the sites' ports (those were free a moment ago only).
      const proxyTo = async (target: number): Promise<FaultProxy> => {
        for (let i = 0; i < 20; i++) {
          const p = await FaultProxy.start({ host: '127.0.0.1', port: target });
          if (!ports.includes(p.port) && !proxies.some((q) => q.port === p.port)) return p;
          await p.close();
        }
        throw new Error('no proxy port distinct from the site ports');
      };
      const proxyAB = await proxyTo(mirB);
      proxies.push(proxyAB);
      const proxyBA = await proxyTo(mirA);
      proxies.push(proxyBA);

      const mirror = (listen: number, peer: number, peerSite: string, extra?: Record<string, unknown>) => ({
        listen: { host: '127.0.0.1', port: listen },
        peer: { host: '127.0.0.1', port: peer, site: peerSite },
        connections: opts.connections ?? 4,
        reconnectMs: 100,
        connectTimeoutMs: 2000,
        heartbeat: SHORT_HEARTBEAT,
        ...extra,
      });
      const inputs = {
        a: {
          site: 'a', listen: { host: '127.0.0.1', port: nbdA }, admin: { host: '127.0.0.1', port: admA },
          dataDir: dataDirs.a, shutdownTimeoutMs: 2000,
          mirror: mirror(mirA, proxyAB.port, 'b', opts.mirrorA),
          luns: [{ name: 'lun0', path: files.a, role: 'primary', mirror: opts.mode }],
        },
        b: {
          site: 'b', listen: { host: '127.0.0.1', port: nbdB }, admin: { host: '127.0.0.1', port: admB },
          dataDir: dataDirs.b, shutdownTimeoutMs: 2000,
          mirror: mirror(mirB, proxyBA.port, 'a'),
          luns: [{ name: 'lun0', path: files.b, role: 'secondary', mirror: 'none' }],
        },
      } satisfies { a: SiteConfigInput; b: SiteConfigInput };
      const started = await Promise.allSettled([startSite(inputs.a), startSite(inputs.b)]);
      const ok = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
      const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) {
        await Promise.allSettled(ok.map((s) => s.stop()));
        throw failed.reason;
      }
      const [a, b] = ok;
      const pair = new OutagePair(dir, a, b, proxyAB, proxyBA, inputs, files, dataDirs);
      pair.history.a.push(a);
      pair.history.b.push(b);
      return pair;
    } catch (err) {
      await Promise.allSettled(proxies.map((p) => p.close()));
      throw err;
    }
  }

  /** Black-hole both directions (TCP and UDP). */
  cut(): void {
    this.proxyAB.cut();
    this.proxyBA.cut();
  }

  /** Forward both directions again (black-holed connections are reset). */
  heal(): void {
    this.proxyAB.heal();
    this.proxyBA.heal();
  }

  /** SIGKILL a site and wait until it is gone (its temp config dir is removed; dataDir stays). */
  async kill(which: 'a' | 'b'): Promise<void> {
    const site = this[which];
    if (site.isAlive()) site.proc.kill('SIGKILL');
    await site.exited;
    await site.stop();
  }

  /** Start a site again with the same configuration (ports, dataDir, LUNs); `env` for its process. */
  async restart(which: 'a' | 'b', env?: NodeJS.ProcessEnv): Promise<Site> {
    const site = await startSite(this.inputs[which], env ? { env } : {});
    this[which] = site;
    this.history[which].push(site);
    return site;
  }

  async status(which: 'a' | 'b'): Promise<FullStatus> {
    return (await siteStatus(this[which])) as unknown as FullStatus;
  }

  /** The primary LUN's status on a. */
  async lun(): Promise<PrimaryLunStatus & { health: string }> {
    const st = await this.status('a');
    const l = st.luns.find((x) => x.name === 'lun0');
    if (!l) throw new Error('a has no lun0 in its status');
    return { ...l, health: st.mirror?.health ?? 'none' };
  }

  /** Poll a's lun0 until `pred` holds; the error names the last status seen. */
  async waitLun(pred: (l: PrimaryLunStatus & { health: string }) => boolean, what: string, timeoutMs = 15_000) {
    let last: unknown = null;
    try {
      return await pollUntil(async () => {
        const l = await this.lun();
        last = l;
        return pred(l) && l;
      }, { timeoutMs, intervalMs: 50, what });
    } catch (err) {
      throw new Error(`${(err as Error).message}; last status: ${describe(last)}`);
    }
  }

  /** Parsed JSON log lines of every run of a site, with `message` equal to `msg` (all if omitted). */
  logLines(which: 'a' | 'b', msg?: string): LogLine[] {
    const out: LogLine[] = [];
    for (const site of this.history[which]) {
      for (const line of site.logs) {
        if (!line.startsWith('{')) continue;
        try {
          const obj = JSON.parse(line) as LogLine;
          if (msg === undefined || obj.message === msg) out.push(obj);
        } catch { /* not JSON */ }
      }
    }
    return out;
  }

  /** a's "LUN mirror state" transitions so far: the `to` states in order. */
  lunTransitions(): string[] {
    return this.logLines('a', 'LUN mirror state').map((l) => String(l.to));
  }

  /**
   * Converged: a's lun0 uptodate and sha256(a) == sha256(b). Polls until then or the deadline;
   * the error lists the first differing 64 KiB chunks. Then, within `settleMs` each: a host FLUSH
   * on a's lun0 completes, and nothing is left in flight (inflight and lagBytes 0).
   */
  async waitConverged(timeoutMs = 30_000, settleMs = 5000): Promise<{ ms: number; hash: string }> {
    const t0 = Date.now();
    const deadline = t0 + timeoutMs;
    let last: unknown = null;
    let converged: { ms: number; hash: string } | null = null;
    while (!converged) {
      let l: (PrimaryLunStatus & { health: string }) | null = null;
      try {
        l = await this.lun();
        last = l;
      } catch (err) {
        last = (err as Error).message;
      }
      if (l && l.state === 'uptodate') {
        const [ha, hb] = await Promise.all([sha256File(this.files.a), sha256File(this.files.b)]);
        if (ha === hb) {
          converged = { ms: Date.now() - t0, hash: ha };
          break;
        }
        last = { ...l, hashes: [ha, hb] };
      }
      if (Date.now() >= deadline) {
        const diff = await differingChunks(this.files.a, this.files.b);
        throw new Error(`not converged within ${timeoutMs} ms: last status ${describe(last)}; ` +
          `differing 64 KiB chunks (first 10 of ${diff.count}): ${diff.first.join(', ')}; ` +
          `a's transitions: ${this.lunTransitions().join(' -> ')}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    const flush = await execNoThrow(PYTHON, ['-c', FLUSH_SCRIPT, this.a.uri('lun0')], { timeoutMs: settleMs });
    if (flush.code !== 0) {
      const l = await this.lun().catch(() => null);
      throw new Error(`converged, but a host FLUSH on a:lun0 did not complete within ${settleMs} ms ` +
        `(${flush.timedOut ? 'timed out' : `exit ${flush.code}: ${flush.stderr.trim()}`}); status ${describe(l)}`);
    }
    await this.waitLun((l) => l.inflight === 0 && l.lagBytes === 0,
      'converged (uptodate, identical copies): nothing left in flight (status inflight 0, lagBytes 0)', settleMs);
    return converged;
  }

  async stop(): Promise<void> {
    const results = await Promise.allSettled([
      ...this.history.a.map((s) => s.stop()), ...this.history.b.map((s) => s.stop()),
    ]);
    await Promise.allSettled([this.proxyAB.close(), this.proxyBA.close()]);
    const err = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (err) throw err.reason;
  }
}

function describe(v: unknown): string {
  if (v === null || v === undefined) return 'none';
  if (typeof v === 'string') return v;
  const o = v as Partial<PrimaryLunStatus> & { health?: string; hashes?: string[] };
  return JSON.stringify({
    state: o.state, reason: o.reason, writePath: o.writePath, health: o.health, inflight: o.inflight, lagBytes: o.lagBytes,
    journal: o.journal, dirtyRegions: o.dirtyRegions, resyncPending: o.resyncPending, progress: o.progress,
    recovery: o.recovery, hashes: o.hashes, mirrored: o.mirrored,
  });
}

/** Offsets of the 64 KiB chunks in which two files differ. */
export async function differingChunks(fa: string, fb: string, chunk = 64 * 1024): Promise<{ count: number; first: number[] }> {
  const [a, b] = await Promise.all([fs.readFile(fa), fs.readFile(fb)]);
  const first: number[] = [];
  let count = 0;
  const n = Math.max(a.length, b.length);
  for (let off = 0; off < n; off += chunk) {
    if (!a.subarray(off, off + chunk).equals(b.subarray(off, off + chunk))) {
      count++;
      if (first.length < 10) first.push(off);
    }
  }
  return { count, first };
}

// ---- the journal file (docs/journal-format.md) -------------------------------------------------

export interface JournalFileRecord {
  /** File offset of the record header. */
  start: number;
  seq: number;
  dep: number;
  kind: number;
  offset: number;
  length: number;
  dataLen: number;
  /** start + 52 + dataLen */
  end: number;
}

export const RECORD_HEADER = 52;

/** Walk the records of a journal file (no CRC check: the test damages the file afterwards). */
export async function journalRecords(file: string): Promise<{ headerSize: number; size: number; records: JournalFileRecord[] }> {
  const buf = await fs.readFile(file);
  if (buf.subarray(0, 8).toString('latin1') !== 'NBDMJRNL') throw new Error(`${file}: not a journal`);
  const nameLen = buf.readUInt16BE(18);
  const headerSize = 24 + nameLen;
  const records: JournalFileRecord[] = [];
  let pos = headerSize;
  while (pos + RECORD_HEADER <= buf.length) {
    if (buf.readUInt32BE(pos) !== 0x4e4d4a31) throw new Error(`${file}: no record magic at ${pos}`);
    const dataLen = buf.readUInt32BE(pos + 36);
    const rec: JournalFileRecord = {
      start: pos,
      kind: buf.readUInt8(pos + 4),
      seq: Number(buf.readBigUInt64BE(pos + 8)),
      dep: Number(buf.readBigUInt64BE(pos + 16)),
      offset: Number(buf.readBigUInt64BE(pos + 24)),
      length: buf.readUInt32BE(pos + 32),
      dataLen,
      end: pos + RECORD_HEADER + dataLen,
    };
    if (rec.end > buf.length) throw new Error(`${file}: record at ${pos} runs past the end`);
    records.push(rec);
    pos = rec.end;
  }
  if (pos !== buf.length) throw new Error(`${file}: ${buf.length - pos} trailing bytes after the last record`);
  return { headerSize, size: buf.length, records };
}

/** sha256 of a buffer (hex). */
export function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

// ---- watching a's lun0 ------------------------------------------------------------------------

export interface Sample {
  t: number;
  state: string;
  health: string;
  path: string;
  records: number;
  writeOps: number;
}

/**
 * Polls a's lun0 every intervalMs in the background and keeps every sample (errors, e.g. while a
 * restarts, are skipped). stop() ends the loop; it is idempotent.
 */
export class StatusRecorder {
  readonly samples: Sample[] = [];
  private running = true;
  private readonly loop: Promise<void>;

  constructor(private readonly pair: OutagePair, intervalMs = 50) {
    this.loop = (async () => {
      while (this.running) {
        try {
          const l = await this.pair.lun();
          this.samples.push({ t: Date.now(), state: l.state, health: l.health, path: l.writePath, records: l.journal.records, writeOps: l.counters.writeOps });
        } catch { /* site restarting */ }
        if (this.running) await new Promise((r) => setTimeout(r, intervalMs));
      }
    })();
  }

  /** Samples taken at or after `since` (ms since the epoch). */
  since(since: number): Sample[] {
    return this.samples.filter((s) => s.t >= since);
  }

  /** The distinct consecutive values of `key`, in order. */
  sequence(key: 'state' | 'health' | 'path', since = 0): string[] {
    const out: string[] = [];
    for (const s of this.since(since)) if (out[out.length - 1] !== s[key]) out.push(s[key]);
    return out;
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }
}
