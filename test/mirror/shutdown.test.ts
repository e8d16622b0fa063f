// A site whose mirror peer is unreachable still stops promptly on SIGTERM.
import { expect } from 'chai';
import { Cleanup, freePorts, pollUntil, sparseFile, startSite, tmpDir } from '../helpers/site.js';

describe('mirror pool: shutdown while the peer is unreachable', function () {
  this.timeout(30_000);
  const cleanup = new Cleanup();
  after(() => cleanup.run());

  it('exits 0 within 2 s of SIGTERM right after a failed pool connect (connectTimeoutMs 5000)', async function () {
    const dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    const lun = await sparseFile(dir.join('lun0.img'), 1024 * 1024);
    const [mir, nobody] = await freePorts(2);
    const site = await startSite({
      site: 'a',
      mirror: {
        listen: { host: '127.0.0.1', port: mir },
        peer: { host: '127.0.0.1', port: nobody, site: 'b' },   // nothing listens there
        connections: 4, reconnectMs: 200, connectTimeoutMs: 5000,
      },
      luns: [{ name: 'lun0', path: lun, role: 'primary', mirror: 'sync' }],
    }, { stopGraceMs: 20_000 });
    cleanup.add('stop site', () => site.stop());

    await pollUntil(() => site.logs.some((l) => l.includes('mirror connect failed')), { timeoutMs: 10_000, what: 'a failed pool connect' });
    const t0 = Date.now();
    const exit = await site.stop();
    const ms = Date.now() - t0;
    expect(exit).to.deep.equal({ code: 0, signal: null });
    expect(ms, 'milliseconds from SIGTERM to exit').to.be.below(2000);
  });
});
