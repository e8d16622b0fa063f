// The mirror listener (the peer's pool connects here) and its per-connection handlers: they
// frame requests, order them by dep and dispatch each through the op table below to the
// secondary LUN it is for (secondary-lun.ts applies it).
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import { listenOn } from '../../net/listen.js';
import type { Logger } from '../../log.js';
import type { LunMeta } from '../../persist/lun-meta.js';
import { nbdErrno } from '../../storage/errno.js';
import { FrameParser, STOP, type FrameSink } from '../../net/frame-parser.js';
import { SocketReader } from '../../net/socket-reader.js';
import { CorkedWriter } from '../../net/corked-writer.js';
import type { MirrorTransport } from '../../security/mirror-tls.js';
import { decidePairing } from '../pairing.js';
import {
  CONTROL, CONTROL_REQID, ESTALE, decodeHello, encodeHello, HELLO_ANSWER, HELLO_OFFER, MAX_HASH_LENGTH, MAX_HELLO_LENGTH,
  MAX_MIRROR_PAYLOAD, MAX_SET_GEN_PAYLOAD, MIRROR_OP, OFFER_FLAG, PAIR, PAIR_REASON, readRequestHeader, REPLY_DATA_MAGIC,
  REPLY_DATA_SIZE, REPLY_MAGIC, REPLY_SIZE, REQUEST_HEADER_SIZE, SYNC, writeReply, type LunAnswer, type LunOffer,
  type MirrorRequestHeader,
} from '../wire.js';
import type { SecondaryLun } from './secondary-lun.js';

const EINVAL = 22;
/** A healthy sender keeps at most its async window (+ replay window) in flight; far beyond is abuse. */
const MAX_WAITING_BYTES = 512 * 1024 * 1024;   // a request of a primary run that has been superseded

/** A LUN of this site as the receiver sees it (the site's LUN registry gives these). */
export interface ReceiverLun {
  readonly name: string;
  readonly size: number;
  readonly role: 'primary' | 'secondary';
  readonly meta: LunMeta | null;
  /** Its secondary side; null while it is primary. */
  readonly secondary: SecondaryLun | null;
}

/** Exact lookup by name: what the mirror pairs by. */
export interface ReceiverLuns {
  get(name: string): ReceiverLun | undefined;
}

/** A paired LUN of one connection: the secondary it feeds, at the size the primary offered. */
interface Target { name: string; lun: SecondaryLun; size: number }

export interface ReceiverOptions {
  site: string;
  /** Expected peer site name; '' accepts any name but our own. */
  peerSite: string;
  /** How often an idle connection checks whether the peer's heartbeats still arrive. */
  idleCheckMs: number;
  /** False once the peer's heartbeats have been silent for longer than the timeout. */
  peerAlive: () => boolean;
  /** TLS or plain TCP; default plain (unit tests that speak the wire directly). */
  transport?: MirrorTransport;
  /** The peer resolved a split brain by discarding our copy of a LUN that is primary here: demote it. */
  demoteForPeer?: (lun: string) => Promise<void>;
}

export class MirrorReceiver {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly handlers = new Set<ReceiverConnection>();
  /** The pairing last logged per LUN (feeder, sync, reason): "paired" is logged when it changes. */
  private readonly loggedPairing = new Map<string, string>();

  constructor(private readonly luns: ReceiverLuns, private readonly opts: ReceiverOptions, private readonly log: Logger) {
    this.server = opts.transport
      ? opts.transport.createServer((s) => void this.accept(s))
      : net.createServer({ noDelay: true }, (s) => void this.accept(s));
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  private async accept(socket: net.Socket): Promise<void> {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    this.sockets.add(socket);
    socket.on('error', () => undefined);
    socket.on('close', () => this.sockets.delete(socket));
    const reader = new SocketReader(socket);
    try {
      const len = (await reader.read(4)).readUInt32BE(0);
      if (len > MAX_HELLO_LENGTH) throw new Error(`hello of ${len} bytes`);
      const hello = decodeHello(await reader.read(len));
      if (hello.kind !== HELLO_OFFER) throw new Error('expected an offer hello');
      if (hello.site === this.opts.site) throw new Error(`peer claims our own site name "${hello.site}"`);
      if (this.opts.peerSite && hello.site !== this.opts.peerSite) {
        throw new Error(`peer is site "${hello.site}", expected "${this.opts.peerSite}"`);
      }
      const targets = new Map<number, Target>();
      const answers: LunAnswer[] = [];
      for (const o of hello.offers) answers.push(await this.pair(o, hello.site, targets));
      // Pairing may wait (metadata, a demote): a peer that left meanwhile feeds nothing.
      if (socket.destroyed) {
        for (const t of targets.values()) t.lun.pairingAbandoned();
        reader.detach();
        return;
      }
      socket.write(encodeHello({ kind: HELLO_ANSWER, site: this.opts.site, session: hello.session, offers: [], answers }));
      const handler = new ReceiverConnection(socket, targets, peer, this.log);
      // Idle handlers check their element: if the peer's heartbeats stopped, the link is down.
      // 'timeout' fires once per idle spell: re-arm it while the peer is alive, or a connection
      // that went idle just before the peer vanished would never be checked again.
      const idleCheck = (): void => {
        if (this.opts.peerAlive()) {
          socket.setTimeout(this.opts.idleCheckMs);
          return;
        }
        this.log.info('closing idle mirror connection: peer heartbeats stopped', { peer });
        socket.destroy();
      };
      socket.setTimeout(this.opts.idleCheckMs);
      socket.on('timeout', idleCheck);
      for (const t of targets.values()) t.lun.connectionOpened();
      this.handlers.add(handler);
      socket.on('close', () => {
        this.handlers.delete(handler);
        handler.closed();
        for (const t of targets.values()) t.lun.connectionClosed();
      });
      handler.start(reader.detach());
    } catch (err) {
      reader.detach();
      this.log.warn('mirror connection refused', { peer, reason: (err as Error).message });
      socket.destroy();
    }
  }

  /** Decide whether an offered primary LUN may feed our LUN of the same name (pairing.ts). */
  private async pair(offer: LunOffer, site: string, targets: Map<number, Target>): Promise<LunAnswer> {
    const lun = this.luns.get(offer.name);
    const answer = (status: number, sync: number = SYNC.INCREMENTAL, applied = 0): LunAnswer => ({
      id: offer.id, status, size: lun?.size ?? 0, sync, current: lun?.meta?.current ?? '', applied, copy: lun?.meta?.data.copyId ?? '',
    });
    const refuse = (status: number, reason = PAIR_REASON[status]): LunAnswer => {
      this.log.warn('mirror LUN refused', { lun: offer.name, from: site, status, reason });
      return answer(status);
    };
    if (!lun) return refuse(PAIR.MISSING);
    if (lun.size < offer.size) return refuse(PAIR.SMALLER);
    const meta = lun.meta;
    if (!meta) return refuse(lun.role === 'secondary' ? PAIR.MISSING : PAIR.NOT_SECONDARY);
    const verdict = decidePairing(offer, meta.data, lun.role);
    if (verdict.status === PAIR.SPLIT_BRAIN && !meta.data.splitBrain) {
      this.log.error('split brain: both sites wrote this LUN as primary while apart; it stays disconnected until resolved', {
        lun: lun.name, current: meta.current, peerCurrent: offer.lineage.current,
      });
      await meta.update({ splitBrain: { detectedMs: Date.now(), peerCurrent: offer.lineage.current } });
    }
    if (verdict.status !== PAIR.OK) return refuse(verdict.status, verdict.reason);
    const fed = lun.secondary?.feeder;
    if (fed && fed !== site) return refuse(PAIR.DUPLICATE);
    if (offer.flags & OFFER_FLAG.FORCE) {
      this.log.warn('the peer resolved a split brain by discarding this site\'s copy: it is overwritten', { lun: lun.name, from: site });
      if (lun.role === 'primary') {
        if (!this.opts.demoteForPeer) return refuse(PAIR.NOT_SECONDARY);
        await this.opts.demoteForPeer(lun.name);
      }
      // Until the overwrite completes, this copy is related to nothing the peer has: every later
      // pairing must compare it whole (the peer keeps forcing until then).
      await meta.update({ splitBrain: null, localChanges: true });
    }
    // (After a demote for the peer: the secondary it became.)
    const secondary = lun.secondary;
    if (!secondary) return refuse(PAIR.MISSING);
    const sync = verdict.sync === SYNC.FULL ? 'full' : 'incremental';
    // Each connection of the peer's pool pairs the LUN again: log only a change of the pairing.
    const key = `${site}\0${sync}\0${verdict.reason}`;
    const changed = this.loggedPairing.get(lun.name) !== key;
    this.loggedPairing.set(lun.name, key);
    const applied = secondary.paired(site, offer.instance, offer.nextSeq, { sync, reason: verdict.reason });
    targets.set(offer.id, { name: lun.name, lun: secondary, size: offer.size });
    if (changed) this.log.info('mirror LUN paired', { lun: lun.name, from: site, sync, reason: verdict.reason });
    return answer(PAIR.OK, verdict.sync, applied);
  }

  /**
   * Our LUNs changed (a reload): ask the peer to offer its LUNs again, in band, so it renegotiates
   * at once without taking it for an outage. A removed LUN's requests are answered ESTALE meanwhile.
   */
  requestReoffer(reason: string, removed?: string): void {
    if (this.handlers.size) this.log.info('asking the peer to offer its LUNs again', { reason });
    for (const h of this.handlers) {
      if (removed) h.forget(removed);
      h.control(CONTROL.REOFFER);
    }
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}

// ---- the op table ---------------------------------------------------------------------------------

/** One MIRROR_OP: what follows its header, which headers are well-formed, and what it does. */
interface OpHandler {
  /** Payload bytes after the header, or why the header breaks the protocol (the connection closes). */
  payload(h: MirrorRequestHeader): number | string;
  /** A request the peer may send for this LUN (otherwise EINVAL). */
  valid(h: MirrorRequestHeader, t: Target): boolean;
  run(c: ReceiverConnection, h: MirrorRequestHeader, payload: Buffer | null, t: Target): Promise<void>;
}

const none = (): number => 0;
/** WRITE, WRITE_ZEROES, TRIM: numbered, ordered by dep, within the size the primary offered. */
const ordered = (h: MirrorRequestHeader, t: Target): boolean => h.seq > 0 && h.length > 0 && h.offset + h.length <= t.size;
const applyOrdered: OpHandler['run'] = (c, h, payload, t) => c.applyOrdered(h, payload, t);

const HANDLERS: ReadonlyMap<number, OpHandler> = new Map<number, OpHandler>([
  [MIRROR_OP.WRITE, {
    payload: (h) => (h.length > MAX_MIRROR_PAYLOAD ? `mirror write of ${h.length} bytes` : h.length), valid: ordered, run: applyOrdered,
  }],
  [MIRROR_OP.WRITE_ZEROES, { payload: none, valid: ordered, run: applyOrdered }],
  [MIRROR_OP.TRIM, { payload: none, valid: ordered, run: applyOrdered }],
  [MIRROR_OP.FLUSH, {
    payload: none, valid: () => true,
    run: async (c, h, _p, t) => { await t.lun.flush(); c.answer(h.reqId, 0); },
  }],
  [MIRROR_OP.HASH, {
    payload: none,
    valid: (h, t) => h.seq === 0 && h.length > 0 && h.length <= MAX_HASH_LENGTH && h.offset + h.length <= t.lun.size,
    run: async (c, h, _p, t) => { if (await c.after(h, t)) c.answer(h.reqId, 0, await t.lun.hash(h.offset, h.length)); },
  }],
  [MIRROR_OP.SET_GEN, {
    payload: (h) => (h.length > MAX_SET_GEN_PAYLOAD ? `SET_GEN of ${h.length} bytes` : h.length), valid: (h) => h.seq === 0,
    run: async (c, h, payload, t) => { if (await c.after(h, t)) c.answer(h.reqId, await t.lun.adopt(payload)); },
  }],
]);
for (const [name, op] of Object.entries(MIRROR_OP)) {
  if (!HANDLERS.has(op)) throw new Error(`mirror op ${name} has no handler`);
}

/** One pool connection from the peer: parse, validate, order, dispatch, answer. */
class ReceiverConnection implements FrameSink {
  private readonly parser = new FrameParser(REQUEST_HEADER_SIZE, this);
  private current: MirrorRequestHeader | null = null;
  private op: OpHandler | undefined = undefined;
  /** Payload bytes of requests waiting for their dependencies (bounded: a peer cannot park memory here). */
  private waitingBytes = 0;
  private readonly out: CorkedWriter;
  private readonly removed = new Map<number, string>();

  constructor(
    private readonly socket: net.Socket,
    private readonly targets: Map<number, Target>,
    private readonly peer: string,
    private readonly log: Logger,
  ) {
    this.out = new CorkedWriter(socket);
  }

  start(leftover: Buffer): void {
    this.socket.on('data', (chunk: Buffer) => this.parser.push(chunk));
    if (leftover.length) this.parser.push(leftover);
  }

  onHeader(buf: Buffer, at: number): number {
    const h = readRequestHeader(buf, at);
    if (!h) return this.violate('bad mirror request header');
    this.current = h;
    this.op = HANDLERS.get(h.type);
    // An unknown op carries nothing; it is answered EINVAL.
    const payload = this.op ? this.op.payload(h) : 0;
    return typeof payload === 'string' ? this.violate(payload) : payload;
  }

  onFrame(payload: Buffer | null): void {
    const h = this.current!;
    const op = this.op;
    this.current = null;
    this.op = undefined;
    if (this.removed.has(h.lunId)) return this.answer(h.reqId, ESTALE);
    const target = this.targets.get(h.lunId);
    if (!target || !op || !op.valid(h, target)) {
      if (target) target.lun.applied.errors++;
      return this.answer(h.reqId, EINVAL);
    }
    void this.apply(op, h, payload, target);
  }

  onDiscarded(): void { /* nothing is discarded on this wire */ }

  /** Stop applying requests for a LUN removed by a reload; they are answered ESTALE. */
  forget(lun: string): void {
    for (const [id, t] of this.targets) if (t.name === lun) this.removed.set(id, t.name);
    for (const id of this.removed.keys()) this.targets.delete(id);
  }

  /** Send a control message (a reply with the reserved reqId). */
  control(code: number): void {
    this.answer(CONTROL_REQID, code);
  }

  /** The connection closed: requests it has waiting are released unapplied (a resend comes with the next session). */
  closed(): void {
    for (const t of this.targets.values()) t.lun.order.drop(this);
  }

  private async apply(op: OpHandler, h: MirrorRequestHeader, payload: Buffer | null, t: Target): Promise<void> {
    t.lun.primarySends();
    try {
      await op.run(this, h, payload, t);
    } catch (err) {
      t.lun.applied.errors++;
      this.log.error('applying a mirror request failed', { lun: t.name, seq: h.seq, error: (err as Error).message });
      this.answer(h.reqId, nbdErrno(err));
    }
  }

  /** An unnumbered request (HASH, SET_GEN) waits for its dep; false: its session is gone. */
  async after(h: MirrorRequestHeader, t: Target): Promise<boolean> {
    const wait = t.lun.order.ready(h.dep, this);
    if (wait) await wait;
    return !this.socket.destroyed;
  }

  async applyOrdered(h: MirrorRequestHeader, payload: Buffer | null, t: Target): Promise<void> {
    const { order, applied } = t.lun;
    if (order.isApplied(h.seq)) return this.answer(h.reqId, 0);
    const epoch = order.epoch;
    const wait = order.ready(h.dep, this);
    if (wait) {
      this.waitingBytes += h.length;
      if (this.waitingBytes > MAX_WAITING_BYTES) {
        this.violate(`more than ${MAX_WAITING_BYTES} bytes of requests waiting for their dependencies`);
      }
      await wait;
      this.waitingBytes -= h.length;
    }
    // Its session is gone, or a new run of the primary took over while it waited: drop it unapplied.
    if (this.socket.destroyed || order.epoch !== epoch) {
      if (!this.socket.destroyed) this.answer(h.reqId, ESTALE);
      return;
    }
    // A resend of a request still being applied waits for that one instead of applying twice.
    const running = order.running(h.seq);
    if (running) {
      await running;
      return this.answer(h.reqId, 0);
    }
    if (order.isApplied(h.seq)) return this.answer(h.reqId, 0);
    t.lun.recordBefore(h.dep);
    await order.run(h.seq, () => t.lun.write(h, payload));
    applied.ops++;
    applied.bytes += h.length;
    this.answer(h.reqId, 0);
  }

  answer(reqId: number, errno: number, data?: Buffer): void {
    if (this.socket.destroyed) return;
    const out = Buffer.allocUnsafe(REPLY_SIZE + (data ? REPLY_DATA_SIZE : 0));
    writeReply(out, 0, reqId, errno, data ? REPLY_DATA_MAGIC : REPLY_MAGIC);
    if (data) data.copy(out, REPLY_SIZE);
    this.out.write(out);
  }

  private violate(reason: string): number {
    this.log.warn('mirror protocol violation, closing connection', { peer: this.peer, reason });
    this.socket.destroy();
    return STOP;
  }
}
