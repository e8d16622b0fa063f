// Fuzz: the journal recovery scanner (src/persist/journal.ts). Files made of a valid header and
// valid records, then damaged (bit flips, overwritten bytes, truncation, appended garbage or
// zeros), are opened with Journal.inspect (read-only) and Journal.open (recovery). Both throw
// nothing but JournalError (and only for a damaged header), never hang, recover exactly the
// records before the first damaged one (a prefix of what was written), report torn tail /
// corruption consistently (offsets, sizes, saved copy), inspect changes nothing, and a second
// open after recovery finds a clean journal with the same records.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { expect } from 'chai';
import fc from 'fast-check';
import { Journal, JOURNAL_KIND, JournalError, type JournalEntry } from '../../src/persist/journal.js';
import {
  headerCrc, JOURNAL_MAGIC, journalHeaderFixed, journalHeaderSize, RECORD_CRC_OFFSET, RECORD_HEADER_SIZE, RECORD_MAGIC,
  writeRecordHeader,
} from '../../src/persist/record.js';
import { MIRROR_FLAG } from '../../src/mirror/wire.js';
import { bytes, fuzz, timeoutFor, within, type TargetBudget } from './harness.js';

const LUN = 'lun-ä0';
const LUN_SIZE = 1024 * 1024;
const NAME = Buffer.from(LUN, 'utf8');
const HEADER_LEN = journalHeaderSize(NAME.length);
const SETTLE_MS = 5000;

interface Rec { seq: number; dep: number; kind: number; flags: number; offset: number; length: number; timeMs: number; data: Buffer | null }

// ---- an independent encoder of the documented format -----------------------------------------------

function encodeHeader(): Buffer {
  const buf = Buffer.alloc(HEADER_LEN);
  journalHeaderFixed.encode({ magic: JOURNAL_MAGIC, version: 1, lunSize: LUN_SIZE, nameLen: NAME.length }, buf);
  NAME.copy(buf, journalHeaderFixed.span);
  const at = journalHeaderFixed.span + NAME.length;
  headerCrc.encode(crc32c(buf.subarray(0, at)) >>> 0, buf, at);
  return buf;
}

function encodeRecord(r: Rec): Buffer {
  const dataLen = r.kind === JOURNAL_KIND.WRITE ? r.length : 0;
  const out = Buffer.alloc(RECORD_HEADER_SIZE + dataLen);
  writeRecordHeader(out, 0, {
    magic: RECORD_MAGIC, kind: r.kind, flags: r.flags, reserved: 0, seq: r.seq, dep: r.dep, offset: r.offset,
    length: r.length, dataLen, timeMs: r.timeMs, crc: 0,
  });
  if (dataLen) r.data!.copy(out, RECORD_HEADER_SIZE);
  let crc = crc32c(out.subarray(0, RECORD_CRC_OFFSET));
  if (dataLen) crc = crc32c(out.subarray(RECORD_HEADER_SIZE), crc);
  out.writeUInt32BE(crc >>> 0, RECORD_CRC_OFFSET);
  return out;
}

// ---- generation ------------------------------------------------------------------------------------

const recordsArb: fc.Arbitrary<Rec[]> = fc.array(fc.record({
  kind: fc.constantFrom(JOURNAL_KIND.WRITE, JOURNAL_KIND.WRITE_ZEROES),
  flags: fc.constantFrom(0, MIRROR_FLAG.FUA, MIRROR_FLAG.MAY_PUNCH, MIRROR_FLAG.FUA | MIRROR_FLAG.MAY_PUNCH),
  offset: fc.integer({ min: 0, max: LUN_SIZE }),
  length: fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: 4096 })),
  zeroLength: fc.integer({ min: 0, max: LUN_SIZE }),
  depBack: fc.integer({ min: 0, max: 3 }),
  timeMs: fc.oneof(fc.integer({ min: 1_600_000_000_000, max: 1_900_000_000_000 }), fc.constant(0), fc.constant(Number.MAX_SAFE_INTEGER)),
  fill: fc.integer({ min: 0, max: 255 }),
}), { maxLength: 8 }).map((list) => list.map((g, i): Rec => {
  const seq = i + 1;
  const length = g.kind === JOURNAL_KIND.WRITE ? g.length : g.zeroLength;
  const offset = Math.min(g.offset, LUN_SIZE - length);
  const data = g.kind === JOURNAL_KIND.WRITE ? Buffer.from(Array.from({ length }, (_, k) => (g.fill + k * 13) & 0xff)) : null;
  return { seq, dep: Math.max(0, seq - g.depBack), kind: g.kind, flags: g.flags, offset, length, timeMs: g.timeMs, data };
}));

type Mutation =
  | { op: 'flip'; at: number; bit: number; region: 'records' | 'any' }
  | { op: 'set'; at: number; value: number; region: 'records' | 'any' }
  | { op: 'truncate'; at: number }
  | { op: 'append'; bytes: Buffer }
  | { op: 'zeros'; n: number };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ op: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }), region: fc.constantFrom('records' as const, 'records' as const, 'any' as const) }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }), region: fc.constantFrom('records' as const, 'records' as const, 'any' as const) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('truncate' as const), at: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('append' as const), bytes: bytes(120, 1) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('zeros' as const), n: fc.integer({ min: 1, max: 200 }) }) },
);

function mutate(orig: Buffer, muts: Mutation[]): Buffer {
  let b = Buffer.from(orig);
  for (const m of muts) {
    if (m.op === 'flip' || m.op === 'set') {
      if (b.length === 0) continue;
      const lo = m.region === 'records' && b.length > HEADER_LEN ? HEADER_LEN : 0;
      const at = lo + (m.at % (b.length - lo));
      if (m.op === 'flip') b[at] ^= 1 << m.bit;
      else b[at] = m.value;
    } else if (m.op === 'truncate') {
      // Mostly inside the records; sometimes into the header.
      const lo = m.at % 5 === 0 ? 0 : Math.min(HEADER_LEN, b.length);
      b = b.subarray(0, lo + (m.at % (b.length - lo + 1)));
    } else if (m.op === 'append') {
      b = Buffer.concat([b, m.bytes]);
    } else {
      b = Buffer.concat([b, Buffer.alloc(m.n)]);
    }
  }
  return b;
}

// ---- the expected outcome ------------------------------------------------------------------------------

interface Expectation {
  headerBroken: boolean;
  empty: boolean;
  /** Records before the first damaged one. */
  kept: number;
  /** File offset where the valid records end, when something follows them. */
  badAt: number | null;
  /** The damage is certainly corruption (not a torn tail), or certainly a torn tail, or either. */
  classification: 'corrupt' | 'torn' | 'either';
}

function expectation(orig: Buffer, spans: [number, number][], mutated: Buffer, muts: Mutation[]): Expectation {
  if (mutated.length === 0) return { headerBroken: false, empty: true, kept: 0, badAt: null, classification: 'either' };
  const headerBroken = mutated.length < HEADER_LEN || !mutated.subarray(0, HEADER_LEN).equals(orig.subarray(0, HEADER_LEN));
  let kept = 0;
  for (const [s, e] of spans) {
    if (mutated.length < e || !mutated.subarray(s, e).equals(orig.subarray(s, e))) break;
    kept++;
  }
  const end = kept === 0 ? HEADER_LEN : spans[kept - 1][1];
  const badAt = mutated.length > end ? end : null;
  let classification: Expectation['classification'] = 'either';
  const changed: number[] = [];
  for (let i = 0; i < Math.min(orig.length, mutated.length); i++) if (orig[i] !== mutated[i]) changed.push(i);
  const onlyEdits = muts.every((m) => m.op === 'flip' || m.op === 'set');
  if (changed.length === 0 && mutated.length < orig.length) classification = 'torn';   // pure truncation
  else if (changed.length === 0 && mutated.length > orig.length && mutated.subarray(orig.length).every((x) => x === 0)) classification = 'torn';
  else if (onlyEdits && changed.length === 1 && kept <= spans.length - 2) classification = 'corrupt';   // whole records follow the bad one
  return { headerBroken, empty: false, kept, badAt, classification };
}

function stripEntry(e: JournalEntry) {
  return { seq: e.seq, dep: e.dep, kind: e.kind, flags: e.flags, offset: e.offset, length: e.length, timeMs: e.timeMs, dataPos: e.dataPos, recordBytes: e.recordBytes };
}

// ---- the target -----------------------------------------------------------------------------------------

const BUDGET: TargetBudget = { runs: 150, capMs: 3000 };

describe('fuzz: journal recovery', function () {
  this.timeout(timeoutFor(BUDGET));
  let dir: string;
  let n = 0;
  const tally = { clean: 0, torn: 0, corrupt: 0, headerError: 0, empty: 0 };

  before(async function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fuzz-journal-'));
    // The encoder above must agree byte for byte with what Journal writes.
    const file = path.join(dir, 'reference.journal');
    const { journal } = await Journal.open(file, LUN, LUN_SIZE);
    await journal.append({ seq: 1, dep: 0, kind: JOURNAL_KIND.WRITE, flags: MIRROR_FLAG.FUA, offset: 4096, length: 5, data: Buffer.from('hello') });
    await journal.append({ seq: 2, dep: 1, kind: JOURNAL_KIND.WRITE_ZEROES, flags: MIRROR_FLAG.MAY_PUNCH, offset: 0, length: 8192, data: null });
    const entries = [...journal.entries()];
    await journal.close();
    const expected = Buffer.concat([encodeHeader(),
      encodeRecord({ seq: 1, dep: 0, kind: JOURNAL_KIND.WRITE, flags: MIRROR_FLAG.FUA, offset: 4096, length: 5, timeMs: entries[0].timeMs, data: Buffer.from('hello') }),
      encodeRecord({ seq: 2, dep: 1, kind: JOURNAL_KIND.WRITE_ZEROES, flags: MIRROR_FLAG.MAY_PUNCH, offset: 0, length: 8192, timeMs: entries[1].timeMs, data: null })]);
    expect(fs.readFileSync(file).toString('hex')).to.equal(expected.toString('hex'));
  });

  after(function () {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const inputArb = fc.record({ records: recordsArb, mutations: fc.array(mutationArb, { maxLength: 3 }) });

  it('inspect and open recover exactly the valid prefix and report the damage consistently', async function () {
    await fuzz('journal recovery (inspect + open)', fc.asyncProperty(inputArb, async ({ records, mutations }) => {
      const runDir = path.join(dir, `run-${n++}`);
      fs.mkdirSync(runDir);
      try {
        const parts = [encodeHeader(), ...records.map(encodeRecord)];
        const orig = Buffer.concat(parts);
        const spans: [number, number][] = [];
        let at = HEADER_LEN;
        for (const p of parts.slice(1)) { spans.push([at, at + p.length]); at += p.length; }
        const mutated = mutate(orig, mutations);
        const exp = expectation(orig, spans, mutated, mutations);
        const file = path.join(runDir, 'lun.journal');
        fs.writeFileSync(file, mutated);
        const expectedEntries = records.slice(0, exp.kept).map((r, i) => ({
          seq: r.seq, dep: r.dep, kind: r.kind, flags: r.flags, offset: r.offset, length: r.length, timeMs: r.timeMs,
          dataPos: spans[i][0] + RECORD_HEADER_SIZE, recordBytes: spans[i][1] - spans[i][0],
        }));
        const keptBytes = exp.kept === 0 ? 0 : spans[exp.kept - 1][1] - HEADER_LEN;

        // ---- inspect: read-only
        let inspected: Awaited<ReturnType<typeof Journal.inspect>> | null = null;
        try {
          inspected = await within(Journal.inspect(file, LUN, LUN_SIZE), SETTLE_MS, 'Journal.inspect');
        } catch (err) {
          if (!(err instanceof JournalError)) throw new Error(`Journal.inspect threw ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}`);
          expect(exp.headerBroken || exp.empty, `inspect refused an intact header: ${(err as Error).message}`).to.equal(true);
        }
        expect(fs.readFileSync(file).equals(mutated), 'Journal.inspect changed the file').to.equal(true);
        expect(fs.readdirSync(runDir), 'Journal.inspect created files').to.deep.equal(['lun.journal']);
        if (inspected) {
          expect(exp.headerBroken || exp.empty, 'inspect accepted a damaged header').to.equal(false);
          expect(inspected.entries.map(stripEntry)).to.deep.equal(expectedEntries);
          if (exp.badAt === null) {
            expect(inspected.bad).to.equal(null);
            expect(inspected.bytes).to.equal(mutated.length - HEADER_LEN);
          } else {
            expect(inspected.bad, 'inspect missed the damage').to.not.equal(null);
            expect(inspected.bad!.offset).to.equal(exp.badAt);
            expect(inspected.bytes).to.equal(exp.badAt - HEADER_LEN);
            if (exp.classification !== 'either') expect(inspected.bad!.corrupt ? 'corrupt' : 'torn').to.equal(exp.classification);
          }
        }

        // ---- open: recovery
        let opened: Awaited<ReturnType<typeof Journal.open>> | null = null;
        try {
          opened = await within(Journal.open(file, LUN, LUN_SIZE), SETTLE_MS, 'Journal.open');
        } catch (err) {
          if (!(err instanceof JournalError)) throw new Error(`Journal.open threw ${(err as Error)?.constructor?.name}: ${(err as Error)?.message}`);
          expect(exp.headerBroken, `open refused an intact header: ${(err as Error).message}`).to.equal(true);
          expect(fs.readFileSync(file).equals(mutated), 'a refused open changed the file').to.equal(true);
          tally.headerError++;
          return;
        }
        expect(exp.headerBroken && !exp.empty, 'open accepted a damaged header').to.equal(false);
        const { journal, recovery } = opened;
        try {
          expect(journal.entries().map(stripEntry)).to.deep.equal(expectedEntries);
          expect(recovery.records).to.equal(exp.kept);
          expect(recovery.bytes).to.equal(keptBytes);
          expect(journal.bytes).to.equal(keptBytes);
          if (exp.empty || exp.badAt === null) {
            expect(recovery.corrupt).to.equal(null);
            expect(recovery.tornTailBytes).to.equal(0);
            if (exp.empty) tally.empty++;
            else tally.clean++;
          } else {
            expect(recovery.corrupt !== null || recovery.tornTailBytes > 0, 'damage not reported').to.equal(true);
            expect(recovery.corrupt !== null && recovery.tornTailBytes > 0, 'both corrupt and torn').to.equal(false);
            if (recovery.corrupt) {
              tally.corrupt++;
              expect(recovery.corrupt.offset).to.equal(exp.badAt);
              expect(fs.readFileSync(recovery.corrupt.savedAs).equals(mutated), 'saved copy differs from the damaged file').to.equal(true);
              expect(inspected?.bad?.corrupt, 'inspect and open disagree on corruption').to.equal(true);
            } else {
              tally.torn++;
              expect(recovery.tornTailBytes).to.equal(mutated.length - exp.badAt);
              expect(inspected?.bad?.corrupt, 'inspect and open disagree on corruption').to.equal(false);
            }
            if (exp.classification !== 'either') expect(recovery.corrupt ? 'corrupt' : 'torn').to.equal(exp.classification);
          }
        } finally {
          await journal.close();
        }
        expect(fs.statSync(file).size, 'file size after recovery').to.equal(HEADER_LEN + keptBytes);
        expect(fs.readFileSync(file).equals(orig.subarray(0, HEADER_LEN + keptBytes)), 'recovery left bytes other than the valid prefix').to.equal(true);

        // ---- a second open finds a clean journal with the same records
        const again = await within(Journal.open(file, LUN, LUN_SIZE), SETTLE_MS, 'the second Journal.open');
        try {
          expect(again.recovery.corrupt).to.equal(null);
          expect(again.recovery.tornTailBytes).to.equal(0);
          expect(again.journal.entries().map(stripEntry)).to.deep.equal(expectedEntries);
        } finally {
          await again.journal.close();
        }
      } finally {
        fs.rmSync(runDir, { recursive: true, force: true });
      }
    }), BUDGET);
    console.log(`      outcomes: ${JSON.stringify(tally)}`);
  });
});
