// Link state and probation, driven by an injected clock: every rule of the state machine,
// deterministic and instant.
import { expect } from 'chai';
import { LinkMonitor, type LinkState } from '../../src/health/link-monitor.js';

const INTERVAL = 1500;
const TIMEOUT = 4000;
const PROBATION = 10000;

/** A monitor on a manual clock that records every event in order. */
class Harness {
  t = 0;
  readonly mon: LinkMonitor;
  readonly events: string[] = [];
  readonly transitions: [LinkState, LinkState, string][] = [];

  constructor(opts: { intervalMs?: number; timeoutMs?: number; probationMs?: number } = {}) {
    this.mon = new LinkMonitor({
      intervalMs: opts.intervalMs ?? INTERVAL, timeoutMs: opts.timeoutMs ?? TIMEOUT,
      probationMs: opts.probationMs ?? PROBATION, now: () => this.t,
    });
    this.mon.on('state', (from, to, reason) => {
      this.transitions.push([from, to, reason]);
      this.events.push(`state ${from}>${to}`);
    });
    this.mon.on('down', (reason) => this.events.push(`down: ${reason}`));
    this.mon.on('ready', () => this.events.push('ready'));
  }

  at(t: number): this {
    expect(t, 'the clock only moves forward').to.be.at.least(this.t);
    this.t = t;
    return this;
  }

  beat(t: number): this {
    this.at(t).mon.beat();
    return this;
  }

  tick(t: number): this {
    this.at(t).mon.tick();
    return this;
  }

  /** Heartbeats both ways at from, from + INTERVAL, ... and at to: the peer's beat, then our tick. */
  healthy(from: number, to: number): this {
    for (const t of steps(from, to)) this.beat(t).tick(t);
    return this;
  }

  /** Only our own sends (the peer is silent) at from, from + INTERVAL, ... and at to. */
  silent(from: number, to: number): this {
    for (const t of steps(from, to)) this.tick(t);
    return this;
  }

  /** Events since the last call. */
  take(): string[] {
    return this.events.splice(0);
  }

  get state(): LinkState {
    return this.mon.state;
  }
}

function steps(from: number, to: number): number[] {
  const out: number[] = [];
  for (let t = from; t < to; t += INTERVAL) out.push(t);
  out.push(to);
  return out;
}

/** connecting → (beats) → down after silence → probation → ready. */
function toReady(h: Harness): number {
  h.healthy(0, 3000);
  h.silent(4500, 7500);           // last beat 3000: 7500 - 3000 > 4000 → down
  expect(h.state).to.equal('down');
  h.healthy(9000, 9000 + PROBATION);
  expect(h.state).to.equal('ready');
  h.take();
  return 9000 + PROBATION;
}

describe('health/link-monitor', () => {
  it('starts in connecting: may connect, no beat yet, not in probation', () => {
    const h = new Harness();
    expect(h.state).to.equal('connecting');
    expect(h.mon.mayConnect()).to.equal(true);
    expect(h.mon.silentForMs()).to.equal(Infinity);
    expect(h.mon.probationRemainingMs()).to.equal(null);
    expect(h.events).to.deep.equal([]);
  });

  it('connecting: silence longer than timeoutMs from construction → down, once', () => {
    const h = new Harness();
    h.tick(1500).tick(3000).tick(TIMEOUT);
    expect(h.state, 'exactly timeoutMs is not longer than timeoutMs').to.equal('connecting');
    h.tick(TIMEOUT + 1);
    expect(h.state).to.equal('down');
    expect(h.transitions).to.deep.equal([['connecting', 'down', `no heartbeat at all in ${TIMEOUT + 1} ms (timeout ${TIMEOUT} ms)`]]);
    expect(h.take()).to.deep.equal(['state connecting>down', `down: no heartbeat at all in ${TIMEOUT + 1} ms (timeout ${TIMEOUT} ms)`]);
    h.silent(6000, 30000);
    expect(h.take(), 'no more events while down').to.deep.equal([]);
    expect(h.mon.mayConnect()).to.equal(false);
  });

  it('connecting: beats keep it; silence after the last beat → down', () => {
    const h = new Harness();
    h.healthy(0, 60000);
    expect(h.state).to.equal('connecting');
    expect(h.events).to.deep.equal([]);
    expect(h.mon.silentForMs()).to.equal(0);
    h.at(61000);
    expect(h.mon.silentForMs()).to.equal(1000);
    h.tick(64000);
    expect(h.state).to.equal('connecting');
    h.tick(64001);
    expect(h.state).to.equal('down');
    expect(h.transitions[0][2]).to.equal(`no heartbeat for 4001 ms (timeout ${TIMEOUT} ms)`);
  });

  it('connected() → up once; beats keep it up; silence → down with a down event', () => {
    const h = new Harness();
    h.beat(100).at(200);
    h.mon.connected();
    h.mon.connected();
    expect(h.state).to.equal('up');
    expect(h.take()).to.deep.equal(['state connecting>up']);
    expect(h.mon.mayConnect()).to.equal(false);
    h.healthy(1500, 30000);
    expect(h.state).to.equal('up');
    expect(h.take()).to.deep.equal([]);
    const last = h.mon.silentForMs();
    expect(last).to.equal(0);
    h.silent(31500, 34500);   // last beat at 30000: 4500 ms
    expect(h.state).to.equal('down');
    expect(h.take()).to.deep.equal(['state up>down', `down: no heartbeat for 4500 ms (timeout ${TIMEOUT} ms)`]);
  });

  it('up without any beat: silence counts from entering up', () => {
    const h = new Harness();
    h.at(3000);
    h.mon.connected();
    h.tick(4500).tick(6000).tick(7000);
    expect(h.state, '4000 ms since up').to.equal('up');
    h.tick(7001);
    expect(h.state).to.equal('down');
    expect(h.transitions[1][2]).to.equal(`no heartbeat at all in 4001 ms (timeout ${TIMEOUT} ms)`);
  });

  it('down: the first beat starts probation; may not connect during probation', () => {
    const h = new Harness();
    h.silent(1500, 4500);
    expect(h.state).to.equal('down');
    h.take();
    h.beat(5000);
    expect(h.state).to.equal('probation');
    expect(h.transitions.at(-1)).to.deep.equal(['down', 'probation', 'heartbeat from the peer: probation starts']);
    expect(h.take()).to.deep.equal(['state down>probation']);
    expect(h.mon.mayConnect()).to.equal(false);
    expect(h.mon.probationRemainingMs()).to.equal(PROBATION);
    h.tick(5000);
    h.at(6000);
    expect(h.mon.probationRemainingMs()).to.equal(PROBATION - 1000);
  });

  it('probation: ready after probationMs of uninterrupted beats, with one state and one ready event', () => {
    const h = new Harness();
    h.healthy(0, 1500).silent(3000, 6000);
    expect(h.state).to.equal('down');
    h.take();
    // Probation starts with the beat at 7500; ticks at each beat.
    h.healthy(7500, 7500 + PROBATION - INTERVAL);
    expect(h.state).to.equal('probation');
    h.tick(7500 + PROBATION - 1);
    expect(h.state, 'not before probationMs').to.equal('probation');
    expect(h.mon.probationRemainingMs()).to.equal(1);
    expect(h.take()).to.deep.equal(['state down>probation']);
    h.beat(7500 + PROBATION).tick(7500 + PROBATION);
    expect(h.state).to.equal('ready');
    expect(h.transitions.at(-1)).to.deep.equal(['probation', 'ready', `${PROBATION} ms of uninterrupted heartbeats`]);
    expect(h.take()).to.deep.equal(['state probation>ready', 'ready']);
    expect(h.mon.mayConnect()).to.equal(true);
    expect(h.mon.probationRemainingMs()).to.equal(null);
    h.healthy(7500 + PROBATION + INTERVAL, 60000);
    expect(h.take(), 'ready stays ready while beats come').to.deep.equal([]);
  });

  it('probation: a gap longer than 1.5 × intervalMs restarts it; jitter up to 1.5 × does not', () => {
    const h = new Harness();
    h.silent(1500, 4500);
    h.take();
    h.healthy(5000, 8000);                    // probation starts at 5000
    h.beat(8000 + 1.5 * INTERVAL).tick(8000 + 1.5 * INTERVAL);   // 2250 ms: jitter, tolerated
    expect(h.take()).to.deep.equal(['state down>probation']);
    expect(h.mon.probationRemainingMs()).to.equal(5000 + PROBATION - 10250);
    const restart = 10250 + 1.5 * INTERVAL + 1;    // gap of 2251 ms
    h.beat(restart);
    expect(h.state).to.equal('probation');
    expect(h.transitions.at(-1)).to.deep.equal(['probation', 'probation', 'gap of 2251 ms restarts probation']);
    expect(h.take()).to.deep.equal(['state probation>probation']);
    expect(h.mon.probationRemainingMs()).to.equal(PROBATION);
    // The original probation would have ended at 15000: it no longer does.
    h.tick(restart);
    h.healthy(restart + INTERVAL, restart + PROBATION - 1);
    h.tick(restart + PROBATION - 1);
    expect(h.state).to.equal('probation');
    expect(h.take()).to.deep.equal([]);
    // probationMs after the restart, with a fresh beat → ready.
    h.tick(restart + PROBATION);
    expect(h.state).to.equal('ready');
    expect(h.take()).to.deep.equal(['state probation>ready', 'ready']);
  });

  it('probation: completes only while the last beat is fresh; a silent peer leaves it pending', () => {
    const h = new Harness();
    h.silent(1500, 4500);
    h.healthy(5000, 11000);                   // probation from 5000, beats until 11000
    h.take();
    h.silent(12500, 12500 + 5 * INTERVAL);    // past 15000, but the last beat is stale
    expect(h.state).to.equal('probation');
    expect(h.mon.probationRemainingMs(), 'a gap is in progress: the full time remains').to.equal(PROBATION);
    expect(h.take()).to.deep.equal([]);
    h.beat(20000);                            // gap of 9000 ms
    expect(h.take()).to.deep.equal(['state probation>probation']);
    expect(h.transitions.at(-1)![2]).to.equal('gap of 9000 ms restarts probation');
    h.healthy(20000, 30000);
    expect(h.state).to.equal('ready');
  });

  it('probation: a tick within 1.5 × intervalMs of the last beat still counts as fresh', () => {
    const h = new Harness();
    h.silent(1500, 4500);
    h.healthy(5000, 14000);                   // probation from 5000
    h.tick(15000);                            // 1000 ms after the last beat
    expect(h.state).to.equal('ready');
  });

  it('ready: a failed connect attempt changes nothing; the owner retries while mayConnect()', () => {
    const h = new Harness();
    const t = toReady(h);
    // The owner's attempts fail without calling the monitor; beats keep coming.
    h.healthy(t + INTERVAL, t + 20 * INTERVAL);
    expect(h.state).to.equal('ready');
    expect(h.mon.mayConnect()).to.equal(true);
    expect(h.take()).to.deep.equal([]);
    h.at(t + 21 * INTERVAL);
    h.mon.connected();
    expect(h.take()).to.deep.equal(['state ready>up']);
  });

  it('ready: silence longer than timeoutMs → down', () => {
    const h = new Harness();
    const t = toReady(h);
    h.tick(t + TIMEOUT);
    expect(h.state).to.equal('ready');
    h.tick(t + TIMEOUT + 1);
    expect(h.state).to.equal('down');
    expect(h.take()).to.deep.equal(['state ready>down', `down: no heartbeat for ${TIMEOUT + 1} ms (timeout ${TIMEOUT} ms)`]);
    expect(h.mon.mayConnect()).to.equal(false);
  });

  it('connectionLost() from up or probation: down with a down event, then probation again', () => {
    for (const from of ['up', 'probation'] as const) {
      const h = new Harness();
      let t = 0;
      if (from === 'up') {
        h.beat(0);
        h.mon.connected();
      } else {
        h.silent(1500, 4500).beat(5000);
        t = 5000;
      }
      expect(h.state).to.equal(from);
      h.take();
      h.mon.connectionLost('connection reset by peer');
      expect(h.state).to.equal('down');
      expect(h.transitions.at(-1)).to.deep.equal([from, 'down', 'connection reset by peer']);
      expect(h.take(), from).to.deep.equal([`state ${from}>down`, 'down: connection reset by peer']);
      h.mon.connectionLost('again');
      expect(h.take(), 'already down: nothing').to.deep.equal([]);
      h.beat(t + 100);
      expect(h.state, 'the next beat starts a new probation').to.equal('probation');
      expect(h.mon.probationRemainingMs()).to.equal(PROBATION);
    }
  });

  it('connectionLost() in connecting or ready is a failed connect attempt: no transition', () => {
    const h = new Harness();
    h.beat(0).at(10);
    h.mon.connectionLost('connect ECONNREFUSED 127.0.0.1:10810');
    expect(h.state).to.equal('connecting');
    expect(h.mon.mayConnect()).to.equal(true);
    expect(h.mon.lastConnectFailure).to.equal('connect ECONNREFUSED 127.0.0.1:10810');
    expect(h.take()).to.deep.equal([]);
    const r = new Harness();
    const t = toReady(r);
    r.at(t + 500).mon.connectionLost('no answer within 5000 ms');
    expect(r.state, 'probation is not reset').to.equal('ready');
    expect(r.mon.mayConnect()).to.equal(true);
    expect(r.mon.lastConnectFailure).to.equal('no answer within 5000 ms');
    expect(r.take()).to.deep.equal([]);
    r.mon.connected();
    expect(r.mon.lastConnectFailure).to.equal(null);
    r.mon.connectionLost('peer closed the connection');
    expect(r.take()).to.deep.equal(['state ready>up', 'state up>down', 'down: peer closed the connection']);
  });

  it('mayConnect() in each state', () => {
    const h = new Harness();
    const seen: Partial<Record<LinkState, boolean>> = { [h.state]: h.mon.mayConnect() };
    h.mon.on('state', (_from, to) => { seen[to] = h.mon.mayConnect(); });
    toReady(h);
    h.at(h.t);
    h.mon.connected();
    expect(seen).to.deep.equal({ connecting: true, down: false, probation: false, ready: true, up: false });
  });

  it('a whole outage cycle emits each transition exactly once, in order', () => {
    const h = new Harness();
    h.healthy(0, 3000);
    h.at(3000).mon.connected();
    h.healthy(4500, 30000);
    h.silent(31500, 40500);                   // outage: down at 34500
    h.healthy(42000, 46500);                  // probation from 42000
    h.silent(48000, 48000);                   // a missed beat ...
    h.healthy(49500, 49500 + PROBATION);      // ... gap 3000 at 49500 restarts; ready at 59500
    h.at(60000).mon.connected();
    h.mon.connectionLost('peer closed the connection');
    expect(h.transitions.map(([from, to]) => `${from}>${to}`)).to.deep.equal([
      'connecting>up', 'up>down', 'down>probation', 'probation>probation', 'probation>ready', 'ready>up', 'up>down',
    ]);
    expect(h.events.filter((e) => e.startsWith('down:'))).to.have.length(2);
    expect(h.events.filter((e) => e === 'ready')).to.have.length(1);
  });

  it('connected() during an outage goes up anyway (the pool is what it is)', () => {
    const h = new Harness();
    h.silent(1500, 4500);
    h.take();
    h.at(5000).mon.connected();
    expect(h.state).to.equal('up');
    expect(h.take()).to.deep.equal(['state down>up']);
    h.tick(9000);
    expect(h.state).to.equal('up');
    h.tick(9001);
    expect(h.state).to.equal('down');
  });

  it('validates its options and has a working default clock', () => {
    expect(() => new LinkMonitor({ intervalMs: 0, timeoutMs: 1, probationMs: 1 })).to.throw(RangeError);
    expect(() => new LinkMonitor({ intervalMs: 1, timeoutMs: 0, probationMs: 1 })).to.throw(RangeError);
    expect(() => new LinkMonitor({ intervalMs: 1, timeoutMs: 1, probationMs: -1 })).to.throw(RangeError);
    const m = new LinkMonitor({ intervalMs: INTERVAL, timeoutMs: TIMEOUT, probationMs: PROBATION });
    m.tick();
    expect(m.state).to.equal('connecting');
    m.beat();
    expect(m.silentForMs()).to.be.within(0, 1000);
  });
});
