// `nbd-mirror journal inspect`: a read-only report on a LUN's journal.
import fs from 'node:fs';
import { Backing } from '../storage/backing.js';
import { JOURNAL_KIND, Journal } from './journal.js';

export interface JournalReport {
  path: string;
  exists: boolean;
  records: number;
  bytes: number;
  oldestAgeMs: number | null;
  minSeq: number | null;
  maxSeq: number | null;
  corrupt: null | { offset: number; reason: string };
  tornTailAt: number | null;
  entries: Array<{ seq: number; dep: number; kind: string; offset: number; length: number; time: string }>;
}

export async function inspectJournal(path: string, lunName: string, lunPath: string): Promise<JournalReport> {
  const empty: JournalReport = {
    path, exists: false, records: 0, bytes: 0, oldestAgeMs: null, minSeq: null, maxSeq: null, corrupt: null, tornTailAt: null, entries: [],
  };
  if (!fs.existsSync(path)) return empty;
  const backing = await Backing.open(lunPath, true);   // only for the size the journal was written for
  const size = backing.size;
  await backing.close();
  const { entries, bytes, bad } = await Journal.inspect(path, lunName, size);
  const oldest = entries.reduce<number | null>((m, e) => (m === null || e.timeMs < m ? e.timeMs : m), null);
  return {
    path, exists: true, records: entries.length, bytes,
    oldestAgeMs: oldest === null ? null : Date.now() - oldest,
    minSeq: entries[0]?.seq ?? null, maxSeq: entries.at(-1)?.seq ?? null,
    corrupt: bad?.corrupt ? { offset: bad.offset, reason: bad.reason } : null,
    tornTailAt: bad && !bad.corrupt ? bad.offset : null,
    entries: entries.map((e) => ({
      seq: e.seq, dep: e.dep, kind: e.kind === JOURNAL_KIND.WRITE ? 'write' : 'zeroes', offset: e.offset, length: e.length,
      time: new Date(e.timeMs).toISOString(),
    })),
  };
}

export function formatJournalReport(r: JournalReport): string {
  if (!r.exists) return `${r.path}: no journal (nothing waiting for the peer)`;
  const lines = [
    `journal   ${r.path}`,
    `records   ${r.records}${r.records ? ` (seq ${r.minSeq}..${r.maxSeq})` : ''}`,
    `bytes     ${r.bytes}`,
    `oldest    ${r.oldestAgeMs === null ? '-' : `${(r.oldestAgeMs / 1000).toFixed(1)} s ago`}`,
  ];
  if (r.tornTailAt !== null) lines.push(`torn tail at offset ${r.tornTailAt} (a write cut off by a crash; dropped at the next start)`);
  if (r.corrupt) lines.push(`CORRUPT   at offset ${r.corrupt.offset}: ${r.corrupt.reason}`);
  return lines.join('\n');
}
