// Requests up to the 64 MiB maximum payload, as the NBD project's integrityhuge test sends them
// (33-48 MiB READs and WRITEs, checked against the writes), through libnbd into a sync- and an
// async-mirrored LUN: each host write above the mirror's 32 MiB frame goes as several frames,
// and the secondary's copy ends byte-identical to what the host wrote.
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { startPair, waitDrained, waitLunStates } from '../helpers/pair.js';
import { Cleanup, exec, sha256File, sparseFile, tmpDir } from '../helpers/site.js';

const MiB = 1024 * 1024;
const SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'large-requests.py');
// python3-libnbd is a Debian package: use the system interpreter, not whatever is first on PATH.
const PYTHON = '/usr/bin/python3';
const SIZE = 160 * MiB;

interface Result { max_block: number; writes: number; reads: number; mismatches: number[][]; sha256: string }

describe('large requests (33-48 MiB, as integrityhuge) into mirrored LUNs', function () {
  this.timeout(180_000);
  const cleanup = new Cleanup();
  after(() => cleanup.run());

  for (const [i, mode] of (['sync', 'async'] as const).entries()) {
    it(`${mode}: every read matches the writes, and the secondary's copy equals the host's data`, async function () {
      const dir = await tmpDir('nbd-mirror-large-');
      cleanup.add('temp dir', () => dir.cleanup());
      const fileA = await sparseFile(dir.join('a.img'), SIZE);
      const fileB = await sparseFile(dir.join('b.img'), SIZE);
      const pair = await startPair({
        a: { luns: [{ name: 'lun0', path: fileA, role: 'primary', mirror: mode }] },
        b: { luns: [{ name: 'lun0', path: fileB, role: 'secondary', mirror: 'none' }] },
      });
      cleanup.add('pair', () => pair.stop());
      await waitLunStates(pair.a, { lun0: 'uptodate' }, 30_000);
      const r = await exec(PYTHON, [SCRIPT, pair.a.uri('lun0'), String(1000 + i), '6'], { timeoutMs: 120_000 });
      const out = JSON.parse(r.stdout) as Result;
      expect(out.max_block, 'the advertised maximum payload').to.equal(64 * MiB);
      expect([out.writes, out.reads, out.mismatches]).to.deep.equal([6, 6, []]);
      if (mode === 'async') await waitDrained(pair.a, 'lun0', 30_000);
      const status = await waitLunStates(pair.a, { lun0: 'uptodate' }, 30_000);
      expect(status.luns[0]!.state).to.equal('uptodate');
      expect(await sha256File(fileA), "the primary's backing").to.equal(out.sha256);
      expect(await sha256File(fileB), "the secondary's backing").to.equal(out.sha256);
    });
  }
});
