// Regression tests for what the fuzz targets (test/fuzz/*.test.ts) found, each with the concrete
// input that showed it.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { UndoLog } from '../../src/persist/undo-log.js';
import { Lun } from '../../src/lun/lun.js';
import { LunMeta } from '../../src/persist/lun-meta.js';
import { LunRegistry } from '../../src/lun/registry.js';
import { SecondaryRole } from '../../src/lun/roles.js';
import { SecondaryLun } from '../../src/mirror/secondary/secondary-lun.js';
import { MirrorReceiver } from '../../src/mirror/secondary/receiver.js';
import { decodeHello, encodeHello, HELLO_OFFER, MIRROR_OP, OFFER_FLAG, PAIR, writeRequestHeader } from '../../src/mirror/wire.js';
import { IHAVEOPT, NBDMAGIC, OPT } from '../../src/nbd/constants.js';
import { negotiate, NegotiationEnded } from '../../src/nbd/handshake.js';
import { Backing } from '../../src/storage/backing.js';
import { silentLogger } from '../nbd/support.js';
import { sleep, u32, within } from './harness.js';

/** A LUN over a temp file, with its metadata (and, for a secondary, its undo log) as a mirrored site has them. */
async function tempLun(name: string, size: number, role: 'primary' | 'secondary'): Promise<{ lun: Lun; file: string; dir: string; close: () => Promise<void> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fuzz-reg-'));
  const file = path.join(dir, `${name}.img`);
  fs.writeFileSync(file, Buffer.alloc(size));
  const backing = await Backing.open(file, false);
  const meta = await LunMeta.open(path.join(dir, `${name}.meta`), name, size, role);
  const lun = new Lun({ name, path: file, role, mirror: 'none', readOnly: false, description: '' }, backing, meta);
  if (role === 'secondary') {
    const undo = await UndoLog.open(path.join(dir, `${name}.undo`), name, size);
    lun.become(new SecondaryRole(new SecondaryLun(name, backing, meta, undo, null, silentLogger())));
  }
  const close = () => lun.close();   // (closes the secondary's undo log too)
  return { lun, file, dir, close };
}

describe('fuzz regressions', function () {
  this.timeout(20_000);

  // Found by "nbd negotiate (socket)", seed 20240611, shrunk counterexample:
  //   {"clientFlags":0,"items":[],"finish":"export-name","trailer":[],"shuttingDown":true}
  // While the server shuts down, every option but ABORT gets an ERR_SHUTDOWN option reply, and
  // so does NBD_OPT_EXPORT_NAME. But EXPORT_NAME has no option reply: the client reads the
  // export size and flags next, so it takes the reply magic 0x0003e889045565a9 for the size.
  // The only way to refuse EXPORT_NAME is to close the connection.
  it('handshake: NBD_OPT_EXPORT_NAME while shutting down gets no option reply, only the close', async function () {
    const { lun, dir, close } = await tempLun('fuzz-disk', 64 * 1024, 'primary');
    const registry = new LunRegistry();
    registry.add(lun);
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const client = net.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port });
    client.on('error', () => undefined);
    const received: Buffer[] = [];
    client.on('data', (d: Buffer) => received.push(d));
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    const sock = await accepted;
    sock.on('error', () => undefined);
    try {
      const session = negotiate(sock, { luns: registry, isShuttingDown: () => true });
      const name = Buffer.from('fuzz-disk');
      // client flags 0, then IHAVEOPT / NBD_OPT_EXPORT_NAME / length / "fuzz-disk"
      client.write(Buffer.concat([u32(0), IHAVEOPT, u32(OPT.EXPORT_NAME), u32(name.length), name]));
      client.end();
      const err = await within(session.then(() => null, (e: unknown) => e), 2000, 'negotiate()');
      expect(err).to.be.instanceOf(NegotiationEnded);
      sock.end();
      await within(closed, 2000, 'the close');
      const out = Buffer.concat(received);
      expect(out.subarray(0, 8).equals(NBDMAGIC)).to.equal(true);
      expect(out.subarray(18).toString('hex'), 'bytes after the greeting (an option reply to EXPORT_NAME)').to.equal('');
    } finally {
      client.destroy();
      sock.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  // Found while building the "mirror receiver" targets (reading the code for their properties),
  // then confirmed on the wire: a request whose dep is never applied waits in the LUN's
  // ApplyOrder with its payload, and nothing drops it when its connection closes. The next
  // connection of the same primary instance does not wake it either (only a new instance or the
  // dep being applied does). So any client that can reach the mirror port (peerSite '' accepts
  // any site name; there is no authentication) can pin payload memory without bound:
  // connect, offer the LUN, send WRITEs of up to 32 MiB with an unreachable dep, close, repeat.
  // Measured with 4 connections x 8 WRITEs of 1 MiB: 32 waiters and ~32 MiB still held after
  // every connection had closed. There is also no cap on waiting requests per live connection.
  it('mirror receiver: requests waiting for a dep are dropped when their connection closes', async function () {
    const { lun, dir, close } = await tempLun('mirr', 1024 * 1024, 'secondary');
    const registry = new LunRegistry();
    registry.add(lun);
    const receiver = new MirrorReceiver(registry, { site: 'b', peerSite: '', idleCheckMs: 1000, peerAlive: () => true }, silentLogger());
    const { port } = await receiver.listen('127.0.0.1', 0);
    try {
      const instance = Buffer.alloc(8, 7);
      for (let c = 0; c < 2; c++) {
        const s = net.connect({ host: '127.0.0.1', port });
        s.on('error', () => undefined);
        await new Promise<void>((resolve) => s.once('connect', () => resolve()));
        const answer = new Promise<Buffer>((resolve) => s.once('data', resolve));
        s.write(encodeHello({
          kind: HELLO_OFFER, site: 'a', session: Buffer.alloc(8, c), answers: [],
          offers: [{
            id: 0, name: 'mirr', size: 1024 * 1024, instance, nextSeq: 1, flags: 0,
            lineage: { current: '5eed5eed5eed5eed', history: [], peerBase: '' },
          }],
        }));
        const a = await within(answer, 2000, 'the answer hello');
        expect(decodeHello(a.subarray(4, 4 + a.readUInt32BE(0))).answers[0].status).to.equal(PAIR.OK);
        // seq 100 + i, dep 99: seq 1..99 never come.
        for (let i = 0; i < 4; i++) {
          const h = Buffer.alloc(40);
          writeRequestHeader(h, { type: MIRROR_OP.WRITE, flags: 0, lunId: 0, reqId: i + 1, seq: 100 + 10 * c + i, dep: 99, offset: 0, length: 65536 });
          s.write(Buffer.concat([h, Buffer.alloc(65536, 0xab)]));
        }
        await sleep(100);
        const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
        s.destroy();
        await closed;
      }
      const state = lun.secondary!;
      const deadline = Date.now() + 1000;
      while (state.connections !== 0 && Date.now() < deadline) await sleep(5);
      expect(state.connections).to.equal(0);
      await sleep(50);
      expect(state.order.waiting, 'requests (and their payloads) still held for closed connections').to.equal(0);
    } finally {
      await receiver.close();
      await close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  // Found by "mirror receiver (random bytes / bad hello)", seed 20240611, input 38:
  //   a hello offering "mirr" with flags = FORCE (1), then two WRITEs, and the client half-closes
  //   at once (without waiting for the answer).
  // MirrorReceiver.accept() awaits pair() for each offer before it registers its 'close'
  // listener; pair() of a FORCE offer awaits meta.update() (a file write and two fsyncs). If the
  // peer's FIN arrives meanwhile, the socket closes during the await, the listener registered
  // afterwards never fires, and the LUN keeps `connections` = 1 and `feeder` set for good: every
  // later session from another site name is refused DUPLICATE, and the handler is never dropped.
  // (Same for a LUN that is primary here: pair() awaits demoteForPeer().)
  // Measured: after the close, state.connections === 1 and state.feeder === 'a' (0 and null
  // without FORCE); the test delays the metadata write by 100 ms to hit the window every time. Enable once accept() checks for a closed socket after pairing (or registers
  // its 'close' handling before it awaits).
  it('mirror receiver: a peer that closes while a FORCE offer is paired leaves no connection counted', async function () {
    const { lun, dir, close } = await tempLun('mirr', 64 * 1024, 'secondary');
    // The window is a metadata write; widen it so the FIN always lands inside (a slow disk).
    const meta = lun.meta!;
    const update = meta.update.bind(meta);
    let updating: Promise<void> = Promise.resolve();
    meta.update = (change) => {
      updating = sleep(100).then(() => update(change));
      return updating;
    };
    const registry = new LunRegistry();
    registry.add(lun);
    const receiver = new MirrorReceiver(registry, { site: 'b', peerSite: '', idleCheckMs: 1000, peerAlive: () => true }, silentLogger());
    const { port } = await receiver.listen('127.0.0.1', 0);
    try {
      for (const flags of [0, OFFER_FLAG.FORCE]) {
        const s = net.connect({ host: '127.0.0.1', port });
        s.on('error', () => undefined);
        s.on('data', () => undefined);   // (read, so that the close can complete)
        await new Promise<void>((resolve) => s.once('connect', () => resolve()));
        const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
        s.end(encodeHello({
          kind: HELLO_OFFER, site: 'a', session: Buffer.alloc(8, flags), answers: [],
          offers: [{ id: 0, name: 'mirr', size: 64 * 1024, instance: Buffer.alloc(8, 1), nextSeq: 1, flags, lineage: { current: '5eed5eed5eed5eed', history: [], peerBase: '' } }],
        }));
        await within(closed, 2000, 'the close');
        // (The client sees its close before the pairing is done: check once it is.)
        await updating;
        await sleep(50);
        const state = lun.secondary;
        const deadline = Date.now() + 1000;
        while (state && state.connections !== 0 && Date.now() < deadline) await sleep(5);
        expect({ connections: state?.connections ?? 0, feeder: state?.feeder ?? null }, `after the close (flags ${flags})`)
          .to.deep.equal({ connections: 0, feeder: null });
      }
    } finally {
      await receiver.close();
      await close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
