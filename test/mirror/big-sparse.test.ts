// A 1 TiB sparse LUN starts mirroring (issue 18 item 1): the initial sync walks the bitmap in
// chunks and skips holes, so the site keeps its event loop, heartbeats and hosts served.
import { expect } from 'chai';
import fs from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { rawConnect } from '../helpers/nbd-raw.js';
import { siteStatus, startPair, type Pair } from '../helpers/pair.js';
import { Cleanup, readAt, sparseFile, tmpDir } from '../helpers/site.js';

const TiB = 1024 ** 4;
const MiB = 1024 * 1024;
const REGION = 64 * 1024;

interface ProcessStatus { rssBytes: number; eventLoopDelayMaxMs: number }

describe('mirror: a 1 TiB sparse LUN', function () {
  this.timeout(120_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  it('reaches uptodate within 60 s, with RSS, event-loop delay and host reads bounded; the data regions reach the secondary', async function () {
    const dir = await tmpDir('nbd-mirror-big-');
    cleanup.add('temp dir', () => dir.cleanup());
    const fileA = await sparseFile(dir.join('a.img'), TiB);
    const fileB = await sparseFile(dir.join('b.img'), TiB);
    // A few data regions at scattered offsets, written before the sites start.
    const offsets = [0, 3 * REGION, 7 * 1024 * MiB + 5 * REGION, 300 * 1024 * MiB, TiB / 2 + 17 * REGION, TiB - REGION];
    const fh = await fs.open(fileA, 'r+');
    for (const [i, off] of offsets.entries()) await fh.write(Buffer.alloc(REGION, 0x40 + i), 0, REGION, off);
    await fh.close();

    const t0 = performance.now();
    const pair: Pair = await startPair({
      a: { luns: [{ name: 'big', path: fileA, role: 'primary', mirror: 'sync' }] },
      b: { luns: [{ name: 'big', path: fileB, role: 'secondary', mirror: 'none' }] },
    });
    cleanup.add('pair', () => pair.stop());

    // Host reads meanwhile, each bounded.
    const { client } = await rawConnect('127.0.0.1', pair.a.port, 'big');
    cleanup.add('nbd client', async () => { client.destroy(); });
    let reads = 0;
    let maxReadMs = 0;
    let statusMaxMs = 0;
    let state = '';
    let cookie = 1n;
    const deadline = t0 + 60_000;
    while (state !== 'uptodate') {
      expect(performance.now(), `uptodate within 60 s (last state ${state})`).to.be.below(deadline);
      const r0 = performance.now();
      const c = cookie++;
      await client.sendRequest({ type: 0, cookie: c, offset: BigInt(offsets[reads % offsets.length]), length: 4096 });
      const reply = await client.readSimpleReply(() => 4096, 5000);
      maxReadMs = Math.max(maxReadMs, performance.now() - r0);
      expect(reply.error).to.equal(0);
      expect(reply.data![0]).to.equal(0x40 + (reads % offsets.length));
      reads++;
      const s0 = performance.now();
      const st = await siteStatus(pair.a);
      statusMaxMs = Math.max(statusMaxMs, performance.now() - s0);
      state = st.luns.find((l) => l.name === 'big')!.state;
      await new Promise((r) => setTimeout(r, 50));
    }
    const syncMs = performance.now() - t0;
    const procA = ((await siteStatus(pair.a)) as unknown as { process: ProcessStatus }).process;
    const procB = ((await siteStatus(pair.b)) as unknown as { process: ProcessStatus }).process;
    console.log(`      [1 TiB] uptodateMs=${Math.round(syncMs)} reads=${reads} maxReadMs=${maxReadMs.toFixed(1)} maxStatusMs=${statusMaxMs.toFixed(1)} ` +
      `rssA=${(procA.rssBytes / MiB).toFixed(0)}MiB loopMaxA=${procA.eventLoopDelayMaxMs}ms rssB=${(procB.rssBytes / MiB).toFixed(0)}MiB loopMaxB=${procB.eventLoopDelayMaxMs}ms`);
    expect(reads).to.be.greaterThan(0);
    expect(maxReadMs, 'host reads answered meanwhile').to.be.below(500);
    for (const p of [procA, procB]) {
      expect(p.rssBytes, 'RSS').to.be.below(400 * MiB);
      expect(p.eventLoopDelayMaxMs, 'longest event-loop stall').to.be.below(200);
    }
    for (const [i, off] of offsets.entries()) {
      expect((await readAt(fileB, off, REGION)).equals(Buffer.alloc(REGION, 0x40 + i)), `region at ${off} on the secondary`).to.equal(true);
    }
  });
});
