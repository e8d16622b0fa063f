// LunMirror through a fake link: pairing to uptodate, host writes answered out of order (a sync
// write returns when its own answer comes, a flush when every earlier one did), the async window,
// a link that goes down with writes in flight (they go to the journal, in sequence order, and
// so do new ones), and the state table rejecting a transition the code cannot justify.
import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import type { LunMirror } from '../../../src/mirror/primary/lun-mirror.js';
import { ALLOWED, checkTransition, IllegalTransition, type MirrorState } from '../../../src/mirror/primary/mirror-state.js';
import type { CatchUp } from '../../../src/mirror/primary/catch-up.js';
import type { Replicator } from '../../../src/mirror/primary/replicator.js';
import { MAX_MIRROR_PAYLOAD, MIRROR_FLAG, MIRROR_OP, PAIR } from '../../../src/mirror/wire.js';
import { fixture, type Fixture } from './support.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const RS = 64 * KiB;

/** The catch-up worker under way (an internal of LunMirror): the event that pairing work is done. */
function worker(m: LunMirror): Promise<void> | null {
  return (m as unknown as { catchUp: CatchUp }).catchUp.worker;
}

function replicator(m: LunMirror): Replicator {
  return (m as unknown as { r: Replicator }).r;
}

/** True if `p` has settled once the work queued so far has run. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(() => { done = true; }, () => { done = true; });
  await new Promise((r) => setImmediate(r));
  return done;
}

const writes = (f: Fixture) => f.link.sent.filter((op) => op.type === MIRROR_OP.WRITE);

describe('LunMirror (fake link)', function () {
  this.timeout(30_000);
  let f: Fixture;

  afterEach(async () => {
    await f.close();
  });

  async function paired(opts: Parameters<typeof fixture>[0] = {}): Promise<void> {
    f = await fixture({ size: 16 * RS, ...opts });
    f.pair();
    await worker(f.mirror);
    expect([f.mirror.state, f.mirror.path]).to.deep.equal(['uptodate', 'live']);
    f.peer.hold = true;
  }

  it('pairs: a new LUN hands the peer its generation and is up to date', async function () {
    await paired();
    expect(f.link.sent.map((op) => op.type)).to.include(MIRROR_OP.SET_GEN);
    expect(f.meta.data.peerBase).to.equal(f.meta.current);
  });

  it('sync writes answered out of order: each returns with its own answer; a flush waits for all', async function () {
    await paired();
    const data = [0, 1, 2].map(() => randomBytes(4 * KiB));
    const done = data.map((d, i) => f.mirror.write(d, i * RS, false));
    await f.link.sentCount(f.link.sent.length - f.link.unanswered.size + 3);
    const ops = writes(f).slice(-3);
    expect(ops.map((op) => op.seq)).to.deep.equal([1, 2, 3].map((k) => ops[0].seq + k - 1));
    const flushes = () => f.link.sent.filter((op) => op.type === MIRROR_OP.FLUSH).length;
    const flushesBefore = flushes();
    const flush = f.mirror.flush();
    f.link.answer(ops[2]);
    expect(await settled(done[2]), 'the third, answered first').to.equal(true);
    expect(await settled(done[0])).to.equal(false);
    expect(f.mirror.inflight, 'the prefix waits for the first').to.equal(3);
    f.link.answer(ops[0]);
    expect([await settled(done[0]), await settled(done[1])]).to.deep.equal([true, false]);
    expect(await settled(flush), 'the second is not answered yet').to.equal(false);
    expect(flushes(), 'no peer FLUSH before every earlier write is answered').to.equal(flushesBefore);
    f.link.answer(ops[1]);
    await flush;
    expect(f.mirror.inflight).to.equal(0);
    expect(f.link.sent.at(-1)!.type, 'the peer FLUSH after every write').to.equal(MIRROR_OP.FLUSH);
    expect(f.peer.data.subarray(RS, RS + 4 * KiB).equals(data[1])).to.equal(true);
  });

  it('async: writes beyond the window wait until an answer makes room', async function () {
    await paired({ mode: 'async', windowBytes: 2 * RS });
    const a = f.mirror.write(randomBytes(RS), 0, false);
    const b = f.mirror.write(randomBytes(RS), RS, false);
    expect([await settled(a), await settled(b)], 'async: the host does not wait for the peer').to.deep.equal([true, true]);
    expect(f.mirror.inflightBytes).to.equal(2 * RS);
    const c = f.mirror.write(randomBytes(RS), 2 * RS, false);
    expect(await settled(c), 'the window is full').to.equal(false);
    f.link.answer(writes(f).at(-2)!);
    await c;
    expect(f.mirror.inflightBytes).to.equal(2 * RS);
  });

  it('the link goes down with writes in flight: they and new writes go to the journal, in sequence order', async function () {
    await paired();
    const done = [0, 1, 2].map((i) => f.mirror.write(randomBytes(4 * KiB), i * RS, false));
    await f.link.sentCount(f.link.sent.length - f.link.unanswered.size + 3);
    const ops = writes(f).slice(-3);
    f.link.answer(ops[1]);   // answered, but above the acked prefix: journaled too
    f.link.disconnect('cable pulled');
    await Promise.all(done);
    expect([f.mirror.state, f.mirror.path]).to.deep.equal(['journaling', 'journal']);
    // The unanswered ops fail first (as the pool's do), then the pool reports the outage.
    expect(f.mirror.reason).to.equal('link failure: cable pulled');
    await f.mirror.write(randomBytes(4 * KiB), 5 * RS, false);
    expect(f.journal.entries().map((e) => e.seq)).to.deep.equal([...ops.map((op) => op.seq), ops[2].seq + 1]);
    expect(f.link.sentWhileDown, 'nothing is sent to a link that is down').to.deep.equal([]);
    expect(f.mirror.journalStatus().records).to.equal(4);
  });

  it('after the outage the next pairing replays the journal and is up to date again', async function () {
    await paired();
    f.link.disconnect('cut');
    const data = randomBytes(8 * KiB);
    await f.mirror.write(data, 3 * RS, false);
    f.peer.hold = false;
    f.pair({ applied: replicator(f.mirror).seq.ackedPrefix });
    await worker(f.mirror);
    expect([f.mirror.state, f.journal.records]).to.deep.equal(['uptodate', 0]);
    expect(f.peer.data.subarray(3 * RS, 3 * RS + data.length).equals(data)).to.equal(true);
  });

  it('a host write larger than a mirror frame goes as consecutive frames; the reply waits for every one', async function () {
    await paired({ size: 80 * MiB });
    const data = randomBytes(70 * MiB);
    const done = f.mirror.write(data, 4 * KiB, true);
    await f.link.sentCount(f.link.sent.length - f.link.unanswered.size + 3);
    const ops = writes(f).slice(-3);
    expect(ops.map((op) => [op.offset, op.length])).to.deep.equal([
      [4 * KiB, MAX_MIRROR_PAYLOAD], [4 * KiB + MAX_MIRROR_PAYLOAD, MAX_MIRROR_PAYLOAD], [4 * KiB + 2 * MAX_MIRROR_PAYLOAD, 6 * MiB],
    ]);
    expect(ops.map((op) => op.seq - ops[0].seq), 'consecutive numbers').to.deep.equal([0, 1, 2]);
    expect(new Set(ops.map((op) => op.dep)).size, 'the same dep: the frames do not wait for each other').to.equal(1);
    expect(ops.every((op) => (op.flags & MIRROR_FLAG.FUA) !== 0), 'every frame keeps the FUA').to.equal(true);
    f.link.answer(ops[2]);
    f.link.answer(ops[0]);
    expect(await settled(done), 'one frame is still unanswered').to.equal(false);
    f.link.answer(ops[1]);
    await done;
    expect(f.peer.data.subarray(4 * KiB, 4 * KiB + data.length).equals(data)).to.equal(true);
  });

  it('a large write cut mid-way: its unanswered frames are journaled as frames, and the replay completes it', async function () {
    await paired({ size: 80 * MiB });
    const data = randomBytes(40 * MiB);
    const done = f.mirror.write(data, 0, false);
    await f.link.sentCount(f.link.sent.length - f.link.unanswered.size + 2);
    const ops = writes(f).slice(-2);
    f.link.answer(ops[1]);   // above the acked prefix: journaled too
    f.link.disconnect('cut');
    await done;
    expect(f.journal.entries().map((e) => [e.seq, e.offset, e.length])).to.deep.equal([
      [ops[0].seq, 0, MAX_MIRROR_PAYLOAD], [ops[1].seq, MAX_MIRROR_PAYLOAD, 8 * MiB],
    ]);
    f.peer.hold = false;
    f.peer.data.fill(0);
    f.pair({ applied: replicator(f.mirror).seq.ackedPrefix });
    await worker(f.mirror);
    expect([f.mirror.state, f.journal.records]).to.deep.equal(['uptodate', 0]);
    expect(f.peer.data.subarray(0, data.length).equals(data)).to.equal(true);
  });

  it('the state table rejects a transition the code cannot justify', async function () {
    f = await fixture({ size: 16 * RS });
    f.link.up = true;
    f.mirror.offer(0, f.size);
    f.mirror.paired({ id: 0, status: PAIR.SPLIT_BRAIN, size: f.size, sync: 0, current: 'ffffffffffffffff', applied: 0, copy: '' });
    expect(f.mirror.state).to.equal('split-brain');
    expect(() => replicator(f.mirror).transition('uptodate', 'made up')).to.throw(IllegalTransition, /split-brain → uptodate/);
    expect(f.mirror.state, 'unchanged').to.equal('split-brain');
    expect(() => checkTransition('uptodate', 'replaying', 'x')).to.throw(IllegalTransition);
    for (const from of Object.keys(ALLOWED) as MirrorState[]) {
      if (from !== 'connecting') expect(() => checkTransition(from, 'connecting', 'x'), `${from} → connecting`).to.throw(IllegalTransition);
      expect(() => checkTransition(from, 'journaling', 'outage'), `${from} → journaling`).to.not.throw();
      expect(() => checkTransition(from, from, 'a new reason')).to.not.throw();
    }
  });
});
