// The causality checker itself, on small synthetic copies: it must pass consistent copies and
// fail copies that went back in time, lost an acknowledged write, or hold foreign/torn data.
import { expect } from 'chai';
import fs from 'node:fs/promises';
import { BLOCK, causalPattern, checkCausality, decodeBuffer, decodeCopy, type CausalRun, type CausalWrite } from './causality.js';
import { Cleanup, tmpDir } from './site.js';

/** A run from a script of events: ['i', id, block] issues write id to a block, ['a', id] acknowledges it. */
function run(script: (['i', number, number] | ['a', number])[]): CausalRun {
  const writes = new Map<number, CausalWrite>();
  let ev = 0;
  for (const s of script) {
    if (s[0] === 'i') writes.set(s[1], [s[1], s[2] * BLOCK, BLOCK, ev++, -1]);
    else writes.get(s[1])![4] = ev++;
  }
  const ws = [...writes.values()];
  return {
    writes: ws, flushes: [], events: ev, acked: ws.filter((w) => w[4] >= 0).length, unknown: ws.filter((w) => w[4] < 0).length,
    maxLatencyMs: 0, maxFlushMs: 0, error: null, durationMs: 0, seed: 0,
  };
}

function copyOf(ids: number[]): Float64Array {
  return Float64Array.from(ids);
}

describe('causality checker (synthetic copies)', function () {
  // Blocks 0..3. Write 1 -> block 0, acked; 2 -> block 1, acked; then 3 -> block 0 (supersedes 1), acked;
  // then 4 -> block 2 issued and acked; 5 -> block 3 issued, never acked.
  const history = run([
    ['i', 1, 0], ['i', 2, 1], ['a', 1], ['a', 2],
    ['i', 3, 0], ['a', 3],
    ['i', 4, 2], ['a', 4],
    ['i', 5, 3],
  ]);

  it('passes consistent copies (prefixes of the history, unacked writes either way)', function () {
    for (const ids of [
      [0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0], [1, 2, 0, 0], [3, 2, 0, 0], [3, 2, 4, 0], [3, 2, 4, 5],
    ]) {
      const r = checkCausality(copyOf(ids), [history]);
      expect(r.violations, `copy ${ids}`).to.deep.equal([]);
    }
  });

  it('fails a block that went back in time (write 3 on the copy is older than what a later write depends on)', function () {
    // write 4 was issued after 3 was acked: showing 4 with block 0 at 1 is a state no host saw.
    const r = checkCausality(copyOf([1, 2, 4, 0]), [history]);
    expect(r.violationCount).to.equal(1);
    expect(r.violations[0]).to.match(/block 0 .*shows write 1, but write 3 was acknowledged .* before write 4/);
  });

  it('fails a missing acknowledged write that a later write depends on (zeros where write 2 was)', function () {
    const r = checkCausality(copyOf([3, 0, 0, 0]), [history]);
    expect(r.violationCount).to.equal(1);
    expect(r.violations[0]).to.match(/block 1 .*shows zeros, but write 2/);
    // an unacknowledged write on the copy still depends on everything acknowledged before it
    expect(checkCausality(copyOf([3, 2, 0, 5]), [history]).violations[0]).to.match(/block 2 .*write 4 .*before write 5/);
  });

  it('in up-to-date mode, fails any missing acknowledged write, passes the full copy', function () {
    expect(checkCausality(copyOf([3, 2, 4, 0]), [history], { upToDate: true }).violations).to.deep.equal([]);
    expect(checkCausality(copyOf([3, 2, 4, 5]), [history], { upToDate: true }).violations).to.deep.equal([]);
    const r = checkCausality(copyOf([3, 2, 0, 0]), [history], { upToDate: true });
    expect(r.violationCount).to.equal(1);
    expect(r.violations[0]).to.match(/block 2 .*write 4 was acknowledged/);
    // without upToDate the same copy is a consistent earlier state
    expect(checkCausality(copyOf([3, 2, 0, 0]), [history]).violations).to.deep.equal([]);
  });

  it('fails a write shown in a block it was never issued to, and torn data', function () {
    expect(checkCausality(copyOf([2, 0, 0, 0]), [history]).violations[0]).to.match(/never issued to that block/);
    expect(checkCausality(copyOf([-1, 0, 0, 0]), [history]).violations[0]).to.match(/neither zeros nor one whole write/);
  });

  it('spans several runs (event numbers of a later run come after the earlier one)', function () {
    const second = run([['i', 6, 1], ['a', 6], ['i', 7, 3], ['a', 7]]);
    expect(checkCausality(copyOf([3, 6, 4, 7]), [history, second]).violations).to.deep.equal([]);
    // 7 shown, but block 1 still has 2 although 6 was acked before 7 was issued
    expect(checkCausality(copyOf([3, 2, 4, 7]), [history, second]).violationCount).to.equal(1);
    // 6 shown (second run), so everything acked in the first run must be there: block 2 lacks 4
    expect(checkCausality(copyOf([3, 6, 0, 0]), [history, second]).violations[0]).to.match(/block 2 .*write 4/);
  });

  describe('decoding a file', function () {
    const cleanup = new Cleanup();
    after(() => cleanup.run());
    it('decodes zeros, whole writes, a torn block and a block written at the wrong offset', async function () {
      const dir = await tmpDir('nbd-mirror-causality-');
      cleanup.add('temp dir', () => dir.cleanup());
      const buf = Buffer.alloc(6 * BLOCK);
      causalPattern(3, 0, BLOCK).copy(buf, 0);
      causalPattern(9, 2 * BLOCK, 2 * BLOCK).copy(buf, 2 * BLOCK);    // a two-block write
      causalPattern(5, 4 * BLOCK, BLOCK).copy(buf, 4 * BLOCK);
      causalPattern(6, 4 * BLOCK, BLOCK).copy(buf, 4 * BLOCK, 0, 512);  // torn: 512 bytes of another write
      causalPattern(7, 0, BLOCK).copy(buf, 5 * BLOCK);                   // offset 0's data at block 5
      const file = dir.join('copy.img');
      await fs.writeFile(file, buf);
      expect([...(await decodeCopy(file))]).to.deep.equal([3, 0, 9, 9, -1, -1]);
      expect([...decodeBuffer(Buffer.alloc(BLOCK))]).to.deep.equal([0]);
    });
  });
});
