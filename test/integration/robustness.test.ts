// Garbage on the wire and graceful shutdown: the server drops bad connections, keeps serving the
// good ones, and exits cleanly on SIGTERM with requests in flight.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import {
  CMD,
  IHAVEOPT,
  NBD_ERR,
  OPT,
  RawNbdClient,
  REP,
  encodeRequest,
  rawConnect,
} from '../helpers/nbd-raw.js';
import { Cleanup, exec, randomFile, readAt, sha256File, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;
const CLOSE_TIMEOUT_MS = 5_000;

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** 64 KiB of random bytes whose first 4 bytes can't be valid client flags (bit 31 set). */
function garbage(size = 64 * 1024): Buffer {
  const b = randomBytes(size);
  b[0] = b[0]! | 0x80;
  return b;
}

/** Send garbage right after connecting; resolves true if the server hung up on us. */
async function sendGarbageConnection(site: Site): Promise<boolean> {
  const c = await RawNbdClient.connect(site.host, site.port);
  try {
    // The write may fail with EPIPE/ECONNRESET once the server hangs up: that's fine.
    await c.write(garbage()).catch(() => undefined);
    return await c.waitClosed(CLOSE_TIMEOUT_MS);
  } finally {
    c.destroy();
  }
}

describe('robustness', function () {
  describe('garbage from clients', function () {
    const cleanup = new Cleanup();
    let site: Site;
    let dir: Awaited<ReturnType<typeof tmpDir>>;
    let lun0: string;
    const SIZE = 64 * MiB;
    const clients: RawNbdClient[] = [];

    before(async function () {
      dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      lun0 = await sparseFile(dir.join('lun0.img'), SIZE);
      site = await startSite({ luns: [{ name: 'lun0', path: lun0, role: 'primary', mirror: 'none' }] });
      cleanup.add('stop site', () => site.stop());
    });

    afterEach(function () {
      for (const c of clients.splice(0)) c.destroy();
    });

    after(() => cleanup.run());

    /** The server process is up and a real client can still use it. */
    async function expectServerHealthy(): Promise<void> {
      expect(site.isAlive(), `server exited: ${JSON.stringify(site.exitInfo())}\n${site.stderr.join('\n')}`).to.equal(true);
      const r = await exec('nbdinfo', ['--size', site.uri('lun0')], { timeoutMs: 15_000 });
      expect(r.stdout.trim()).to.equal(String(SIZE));
    }

    async function connected(): Promise<RawNbdClient> {
      const { client } = await rawConnect(site.host, site.port, 'lun0');
      clients.push(client);
      return client;
    }

    it('closes a connection that sends 64 KiB of random bytes instead of a handshake', async function () {
      expect(await sendGarbageConnection(site), 'server closed the garbage connection').to.equal(true);
      await expectServerHealthy();
    });

    it('closes a connection that sends a bad option magic after valid client flags', async function () {
      const c = await RawNbdClient.connect(site.host, site.port);
      clients.push(c);
      const flags = await c.readGreeting();
      const cf = Buffer.alloc(4);
      cf.writeUInt32BE(flags & 3);
      await c.write(cf);
      await c.write(randomBytes(4096)).catch(() => undefined); // not IHAVEOPT
      expect(await c.waitClosed(CLOSE_TIMEOUT_MS)).to.equal(true);
      await expectServerHealthy();
    });

    it('does not wait for 4 GiB of option data: an option with length 0xffffffff is refused or the connection closed', async function () {
      const c = await RawNbdClient.connect(site.host, site.port);
      clients.push(c);
      const flags = await c.readGreeting();
      const cf = Buffer.alloc(4);
      cf.writeUInt32BE(flags & 3);
      await c.write(cf);
      const h = Buffer.alloc(16);
      h.writeBigUInt64BE(IHAVEOPT, 0);
      h.writeUInt32BE(OPT.GO, 8);
      h.writeUInt32BE(0xffffffff, 12);
      await c.write(h);
      // Either an error reply (e.g. NBD_REP_ERR_TOO_BIG) or a hang-up, promptly.
      const outcome = await Promise.race([
        c.readOptionReply().then(
          (r) => ({ kind: 'reply' as const, type: r.type }),
          () => ({ kind: 'closed' as const, type: 0 }),
        ),
        c.waitClosed(CLOSE_TIMEOUT_MS).then((closed) => ({ kind: closed ? ('closed' as const) : ('nothing' as const), type: 0 })),
      ]);
      expect(outcome.kind, 'server neither replied nor closed').to.not.equal('nothing');
      if (outcome.kind === 'reply') expect(outcome.type & REP.ERR_BIT, `reply type 0x${outcome.type.toString(16)}`).to.not.equal(0);
      await expectServerHealthy();
    });

    it('closes the connection on a request with a bad magic after a good handshake', async function () {
      const c = await connected();
      await c.write(encodeRequest({ magic: 0xdeadbeef, type: CMD.READ, cookie: 1n, offset: 0n, length: 4096 })).catch(() => undefined);
      expect(await c.waitClosed(CLOSE_TIMEOUT_MS)).to.equal(true);
      await expectServerHealthy();
    });

    it('handles a WRITE header claiming 0xffffffff bytes: closes or replies with an error', async function () {
      const c = await connected();
      const cookie = 0xabcdefn;
      await c.sendRequest({ type: CMD.WRITE, cookie, offset: 0n, length: 0xffffffff });
      // Send a little payload but nowhere near 4 GiB.
      await c.write(randomBytes(64 * 1024)).catch(() => undefined);
      const outcome = await Promise.race([
        c.readSimpleReply().then(
          (r) => ({ kind: 'reply' as const, error: r.error, cookie: r.cookie }),
          () => ({ kind: 'closed' as const, error: 0, cookie: 0n }),
        ),
        c.waitClosed(CLOSE_TIMEOUT_MS).then((closed) => ({ kind: closed ? ('closed' as const) : ('nothing' as const), error: 0, cookie: 0n })),
      ]);
      expect(outcome.kind, 'server neither replied nor closed').to.not.equal('nothing');
      if (outcome.kind === 'reply') {
        expect(outcome.cookie).to.equal(cookie);
        expect([NBD_ERR.EOVERFLOW, NBD_ERR.EINVAL], `error ${outcome.error}`).to.include(outcome.error);
      }
      await expectServerHealthy();
    });

    it('survives a truncated request header followed by a close', async function () {
      const c = await connected();
      await c.write(encodeRequest({ type: CMD.READ, cookie: 7n, offset: 0n, length: 4096 }).subarray(0, 10));
      c.end();
      await c.waitClosed(CLOSE_TIMEOUT_MS);
      // And a truncated WRITE payload.
      const d = await connected();
      await d.write(Buffer.concat([encodeRequest({ type: CMD.WRITE, cookie: 8n, offset: 0n, length: 65536 }), randomBytes(1000)]));
      d.end();
      await d.waitClosed(CLOSE_TIMEOUT_MS);
      await expectServerHealthy();
      // A hand-rolled client still gets served too.
      const e = await connected();
      await e.sendRequest({ type: CMD.READ, cookie: 9n, offset: 0n, length: 4096 });
      const r = await e.readSimpleReply(() => 4096);
      expect(r.error).to.equal(0);
      expect(r.data?.length).to.equal(4096);
    });

    it("keeps another client's transfer correct while garbage connections come and go", async function () {
      const COPY = SIZE; // the whole export, so whole-file hashes apply
      const src = await randomFile(dir.join('concurrent-src.bin'), COPY);
      const out = dir.join('concurrent-out.bin');
      let done = false;
      let garbageSent = 0;
      let garbageClosed = 0;
      const garbageLoop = async () => {
        // Bounded: at most 40 connections per loop, and only while the copy runs.
        for (let i = 0; i < 40 && !done; i++) {
          garbageSent++;
          if (await sendGarbageConnection(site)) garbageClosed++;
        }
      };
      const copy = (async () => {
        try {
          await exec('nbdcopy', ['--flush', src, site.uri('lun0')], { timeoutMs: 60_000 });
          await exec('nbdcopy', [site.uri('lun0'), out], { timeoutMs: 60_000 });
        } finally {
          done = true;
        }
      })();
      await Promise.all([copy, garbageLoop(), garbageLoop(), garbageLoop()]);
      expect(garbageSent, 'garbage was sent during the copy').to.be.greaterThan(0);
      expect(garbageClosed, 'every garbage connection was closed by the server').to.equal(garbageSent);
      expect(await sha256File(out), 'copied data intact').to.equal(await sha256File(src));
      expect(await sha256File(lun0, COPY), 'backing file intact').to.equal(await sha256File(src));
      await expectServerHealthy();
    });
  });

  describe('SIGTERM', function () {
    const cleanup = new Cleanup();
    let site: Site;
    let lun0: string;
    const clients: RawNbdClient[] = [];

    before(async function () {
      const dir = await tmpDir();
      cleanup.add('remove temp dir', () => dir.cleanup());
      lun0 = await sparseFile(dir.join('lun0.img'), 64 * MiB);
      site = await startSite({ luns: [{ name: 'lun0', path: lun0, role: 'primary', mirror: 'none' }] });
      cleanup.add('stop site', () => site.stop());
    });

    after(async function () {
      for (const c of clients.splice(0)) c.destroy();
      await cleanup.run();
    });

    it('exits 0 within a few seconds while a client has writes in flight; acknowledged writes are in the file', async function () {
      const { client } = await rawConnect(site.host, site.port, 'lun0');
      clients.push(client);

      const BLOCK = 256 * 1024;
      const MAX_WRITES = 256; // 64 MiB: each write has its own block
      const QUEUE_DEPTH = 16;
      const fill = (i: number) => (i % 250) + 1;
      const pending = new Map<bigint, number>(); // cookie -> write index
      const acked: number[] = [];
      const badReplies: string[] = [];
      let sent = 0;
      let stopIssuing = false;
      let sigtermAt = 0;
      let inFlightAtSigterm = 0;
      let resolveEnoughAcks!: () => void;
      const enoughAcks = new Promise<void>((r) => (resolveEnoughAcks = r));

      const issue = async () => {
        while (!stopIssuing && !client.isClosed && sent < MAX_WRITES && pending.size < QUEUE_DEPTH) {
          const i = sent++;
          const cookie = BigInt(i + 1);
          pending.set(cookie, i);
          try {
            await client.sendRequest({ type: CMD.WRITE, cookie, offset: BigInt(i * BLOCK), length: BLOCK }, Buffer.alloc(BLOCK, fill(i)));
          } catch {
            return; // connection gone
          }
        }
      };

      const reader = (async () => {
        for (;;) {
          let r;
          try {
            r = await client.readSimpleReply(() => 0, 15_000);
          } catch {
            return; // closed by the server
          }
          const i = pending.get(r.cookie);
          if (i === undefined) {
            badReplies.push(`reply for unknown cookie ${r.cookie}`);
            continue;
          }
          pending.delete(r.cookie);
          if (r.error === 0) acked.push(i);
          else if (r.error === NBD_ERR.ESHUTDOWN) {
            // Spec: on ESHUTDOWN the client must soft-disconnect.
            if (!stopIssuing) {
              stopIssuing = true;
              await client.sendRequest({ type: CMD.DISC, cookie: 0xd15cn, length: 0 }).catch(() => undefined);
            }
          } else badReplies.push(`write ${i}: error ${r.error}`);
          if (acked.length >= 32) resolveEnoughAcks();
          if (sent >= MAX_WRITES && pending.size === 0) return;
          void issue();
        }
      })();

      void issue();
      await withTimeout(enoughAcks, 15_000, '32 acknowledged writes before SIGTERM');
      inFlightAtSigterm = pending.size;
      sigtermAt = Date.now();
      site.proc.kill('SIGTERM');

      const exit = await withTimeout(site.exited, 10_000, 'server exit after SIGTERM');
      const exitMs = Date.now() - sigtermAt;
      stopIssuing = true;
      await withTimeout(reader, 5_000, 'client reader to finish after server exit');

      expect(inFlightAtSigterm, 'requests were in flight when SIGTERM was sent').to.be.greaterThan(0);
      expect(exit, `stderr:\n${site.stderr.join('\n')}`).to.deep.equal({ code: 0, signal: null });
      expect(exitMs, 'exit delay after SIGTERM (ms)').to.be.below(5_000);
      expect(badReplies, 'only success or ESHUTDOWN replies').to.deep.equal([]);
      expect(client.isClosed || (await client.waitClosed(2_000)), 'connection closed').to.equal(true);

      // Every acknowledged write is in the backing file.
      const wrong: number[] = [];
      for (const i of acked) {
        const data = await readAt(lun0, i * BLOCK, BLOCK);
        if (data.length !== BLOCK || !data.every((b) => b === fill(i))) wrong.push(i);
      }
      expect(wrong, `acknowledged writes missing from the file (of ${acked.length})`).to.deep.equal([]);
    });
  });
});
