// The mirror listener (the peer's pool connects here) and its per-connection handlers, which
// apply requests to this site's secondary LUNs in the order the primary fixed.
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import { listenOn } from '../../net/listen.js';
import type { Logger } from '../../log.js';
import type { Lun } from '../../lun/lun.js';
import type { LunRegistry } from '../../lun/registry.js';
import { nbdErrno } from '../../storage/errno.js';
import { FrameParser, STOP, type FrameSink } from '../../net/frame-parser.js';
import { SocketReader } from '../../net/socket-reader.js';
import { CorkedWriter } from '../../net/corked-writer.js';
import type { MirrorTransport } from '../../security/mirror-tls.js';
import { hashRange } from '../../storage/hash.js';
import { ApplyOrder } from './apply-order.js';
import { decidePairing } from '../pairing.js';
import {
  CONTROL, CONTROL_REQID, decodeGeneration, ESTALE, decodeHello, encodeHello, HELLO_ANSWER, HELLO_OFFER, MAX_HASH_LENGTH, MAX_HELLO_LENGTH,
  MAX_MIRROR_PAYLOAD, MAX_SET_GEN_PAYLOAD, MIRROR_FLAG, MIRROR_OP, OFFER_FLAG, PAIR, PAIR_REASON, readRequestHeader, REPLY_DATA_MAGIC,
  REPLY_DATA_SIZE, REPLY_MAGIC, REPLY_SIZE, REQUEST_HEADER_SIZE, SYNC, writeReply, type LunAnswer, type LunOffer,
  type MirrorRequestHeader,
} from '../wire.js';

const EINVAL = 22;
/** A healthy sender keeps at most its async window (+ replay window) in flight; far beyond is abuse. */
const MAX_WAITING_BYTES = 512 * 1024 * 1024;   // a request of a primary run that has been superseded

/** Per secondary LUN: who feeds it and in what order. Survives reconnections. */
export interface SecondaryState {
  order: ApplyOrder;
  feeder: string | null;
  connections: number;
  applied: { ops: number; bytes: number; flushes: number; errors: number };
  /** The write that makes this copy inconsistent is persisting that fact (see apply). */
  losingConsistency: Promise<void> | null;
  /** How the last pairing catches up, and why. */
  pairing: { sync: 'incremental' | 'full'; reason: string } | null;
  /**
   * Restored after a reboot that may have lost answered requests above this point (it was not
   * flushed beyond it): pairings answer it, not the skip-ahead, until the primary sends again.
   */
  lostAbove: number | null;
}

interface Target { lun: Lun; state: SecondaryState; size: number }

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
  readonly secondaries = new Map<string, SecondaryState>();
  /** The pairing last logged per LUN (feeder, sync, reason): "paired" is logged when it changes. */
  private readonly loggedPairing = new Map<string, string>();

  constructor(private readonly luns: LunRegistry, private readonly opts: ReceiverOptions, private readonly log: Logger) {
    this.server = opts.transport
      ? opts.transport.createServer((s) => void this.accept(s))
      : net.createServer({ noDelay: true }, (s) => void this.accept(s));
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  stateOf(lun: string): SecondaryState {
    let s = this.secondaries.get(lun);
    if (!s) {
      s = {
        order: new ApplyOrder(), feeder: null, connections: 0, applied: { ops: 0, bytes: 0, flushes: 0, errors: 0 },
        losingConsistency: null, pairing: null, lostAbove: null,
      };
      // A restarted secondary knows which run it followed and how far: it never applies that again.
      const point = this.luns.get(lun)?.applied;
      if (point?.instance) s.order.restore(point.instance, point.prefix);
      if (point?.instance && point.lostAbove) {
        s.lostAbove = point.prefix;
        this.log.warn('restarted after a reboot: requests answered after the last flush may be lost; the primary resends them', {
          lun, durableUpTo: point.prefix,
        });
      }
      this.secondaries.set(lun, s);
    }
    return s;
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
        for (const t of targets.values()) if (t.state.connections === 0) t.state.feeder = null;
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
      for (const t of targets.values()) t.state.connections++;
      this.handlers.add(handler);
      socket.on('close', () => {
        this.handlers.delete(handler);
        handler.closed();
        for (const t of targets.values()) {
          t.state.connections--;
          if (t.state.connections === 0) t.state.feeder = null;
        }
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
    if (!meta) return refuse(lun.spec.role === 'secondary' ? PAIR.MISSING : PAIR.NOT_SECONDARY);
    const verdict = decidePairing(offer, meta.data, lun.spec.role);
    if (verdict.status === PAIR.SPLIT_BRAIN && !meta.data.splitBrain) {
      this.log.error('split brain: both sites wrote this LUN as primary while apart; it stays disconnected until resolved', {
        lun: lun.name, current: meta.current, peerCurrent: offer.lineage.current,
      });
      await meta.update({ splitBrain: { detectedMs: Date.now(), peerCurrent: offer.lineage.current } });
    }
    if (verdict.status !== PAIR.OK) return refuse(verdict.status, verdict.reason);
    const state = this.stateOf(lun.name);
    if (state.feeder && state.feeder !== site) return refuse(PAIR.DUPLICATE);
    if (offer.flags & OFFER_FLAG.FORCE) {
      this.log.warn('the peer resolved a split brain by discarding this site\'s copy: it is overwritten', { lun: lun.name, from: site });
      if (lun.spec.role === 'primary') {
        if (!this.opts.demoteForPeer) return refuse(PAIR.NOT_SECONDARY);
        await this.opts.demoteForPeer(lun.name);
      }
      // Until the overwrite completes, this copy is related to nothing the peer has: every later
      // pairing must compare it whole (the peer keeps forcing until then).
      await meta.update({ splitBrain: null, localChanges: true });
    }
    const sync = verdict.sync === SYNC.FULL ? 'full' : 'incremental';
    // Each connection of the peer's pool pairs the LUN again: log only a change of the pairing.
    const key = `${site}\0${sync}\0${verdict.reason}`;
    const changed = this.loggedPairing.get(lun.name) !== key;
    this.loggedPairing.set(lun.name, key);
    state.feeder = site;
    // The run we followed before a reboot that lost answered requests: say how far we really got.
    const lost = state.lostAbove !== null && state.order.instance?.equals(offer.instance) ? state.lostAbove : null;
    state.order.resume(offer.instance, offer.nextSeq);
    // (Not while the loss is untold: a restart must still see the point of the reboot.)
    if (lost === null) lun.applied?.record(state.order.instance!, state.order.appliedPrefix);
    state.pairing = { sync, reason: verdict.reason };
    targets.set(offer.id, { lun, state, size: offer.size });
    if (changed) this.log.info('mirror LUN paired', { lun: lun.name, from: site, sync, reason: verdict.reason });
    return answer(PAIR.OK, verdict.sync, Math.max(0, lost ?? state.order.appliedPrefix));
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

/** One pool connection from the peer: parse, validate, order, apply, answer. */
class ReceiverConnection implements FrameSink {
  private readonly parser = new FrameParser(REQUEST_HEADER_SIZE, this);
  private current: MirrorRequestHeader | null = null;
  /** Payload bytes of requests waiting for their dependencies (bounded: a peer cannot park memory here). */
  private waitingBytes = 0;
  private readonly out: CorkedWriter;

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
    if (h.type === MIRROR_OP.SET_GEN) {
      if (h.length > MAX_SET_GEN_PAYLOAD) return this.violate(`SET_GEN of ${h.length} bytes`);
      return h.length;
    }
    if (h.type !== MIRROR_OP.WRITE) return 0;
    if (h.length > MAX_MIRROR_PAYLOAD) return this.violate(`mirror write of ${h.length} bytes`);
    return h.length;
  }

  onFrame(payload: Buffer | null): void {
    const h = this.current!;
    this.current = null;
    if (this.removed.has(h.lunId)) return this.answer(h.reqId, ESTALE);
    const target = this.targets.get(h.lunId);
    if (!target || !this.valid(h, target)) {
      if (target) target.state.applied.errors++;
      return this.answer(h.reqId, EINVAL);
    }
    void this.apply(h, payload, target);
  }

  onDiscarded(): void { /* nothing is discarded on this wire */ }

  /** Stop applying requests for a LUN removed by a reload; they are answered ESTALE. */
  forget(lun: string): void {
    for (const [id, t] of this.targets) if (t.lun.name === lun) this.removed.set(id, t.lun.name);
    for (const id of this.removed.keys()) this.targets.delete(id);
  }

  /** Send a control message (a reply with the reserved reqId). */
  control(code: number): void {
    this.answer(CONTROL_REQID, code);
  }

  private readonly removed = new Map<number, string>();

  /** The connection closed: requests it has waiting are released unapplied (a resend comes with the next session). */
  closed(): void {
    for (const t of this.targets.values()) t.state.order.drop(this);
  }

  private valid(h: MirrorRequestHeader, t: Target): boolean {
    if (h.type === MIRROR_OP.FLUSH) return true;
    if (h.type === MIRROR_OP.SET_GEN) return h.seq === 0;
    if (h.type === MIRROR_OP.HASH) return h.seq === 0 && h.length > 0 && h.length <= MAX_HASH_LENGTH && h.offset + h.length <= t.lun.size;
    if (h.type !== MIRROR_OP.WRITE && h.type !== MIRROR_OP.WRITE_ZEROES && h.type !== MIRROR_OP.TRIM) return false;
    return h.seq > 0 && h.length > 0 && h.offset + h.length <= t.size;
  }

  private async apply(h: MirrorRequestHeader, payload: Buffer | null, t: Target): Promise<void> {
    const { order, applied } = t.state;
    const backing = t.lun.backing;
    // The primary sends again: it has had our answer with the lost point.
    t.state.lostAbove = null;
    try {
      if (h.type === MIRROR_OP.FLUSH) {
        const instance = order.instance;
        const prefix = order.appliedPrefix;   // everything up to here is in the page cache: the flush makes it stable
        await backing.flush();
        if (instance) await t.lun.applied?.flushed(instance, prefix);
        applied.flushes++;
        return this.answer(h.reqId, 0);
      }
      if (h.type === MIRROR_OP.HASH || h.type === MIRROR_OP.SET_GEN) {
        const wait = order.ready(h.dep, this);
        if (wait) await wait;
        if (this.socket.destroyed) return;
        if (h.type === MIRROR_OP.HASH) return this.answer(h.reqId, 0, await hashRange(backing, h.offset, h.length));
        return this.answer(h.reqId, await this.adopt(t, payload));
      }
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
      // Record the applied point up to this request's dep before it lands (applied-point.ts):
      // after a restart nothing at or below it is applied again.
      const point = t.lun.applied;
      if (point && h.dep > point.prefix) point.record(order.instance!, order.appliedPrefix);
      await order.run(h.seq, async () => {
        const meta = t.lun.meta;   // the common case (consistent, live write) costs no await
        if (meta && ((h.flags & MIRROR_FLAG.RESYNC) || !meta.data.consistent || t.state.losingConsistency)) await this.beforeOverwrite(h, t);
        if (h.type === MIRROR_OP.WRITE) await backing.write(payload!, h.offset);
        else await backing.zero(h.offset, h.length, (h.flags & MIRROR_FLAG.MAY_PUNCH) !== 0, false);
        if (h.flags & MIRROR_FLAG.FUA) await backing.flush();
      });
      applied.ops++;
      applied.bytes += h.length;
      this.answer(h.reqId, 0);
    } catch (err) {
      applied.errors++;
      this.log.error('applying a mirror request failed', { lun: t.lun.name, seq: h.seq, error: (err as Error).message });
      this.answer(h.reqId, nbdErrno(err));
    }
  }

  /**
   * A resync write makes this copy inconsistent (persisted before it lands); while inconsistent,
   * each region is saved in the undo log before its first overwrite, so promote can roll back.
   */
  private async beforeOverwrite(h: MirrorRequestHeader, t: Target): Promise<void> {
    const { meta, undo } = t.lun;
    if (!meta) return;
    if ((h.flags & MIRROR_FLAG.RESYNC) && meta.data.consistent) {
      t.state.losingConsistency ??= meta.update({ consistent: false }).then(() => {
        this.log.info('secondary is inconsistent until the resync completes; its last consistent state is kept in the undo log', { lun: t.lun.name });
      }).finally(() => { t.state.losingConsistency = null; });
    }
    if (t.state.losingConsistency) await t.state.losingConsistency;
    // A never-synced copy has no consistent state to keep: no undo log there (nothing to roll back to).
    if (!meta.data.consistent && undo && !meta.neverSynced && !undo.covers(h.offset, h.length)) await undo.protect(t.lun.backing, h.offset, h.length);
  }

  /** SET_GEN: the primary caught up; this copy is consistent again and takes its generation. */
  private async adopt(t: Target, payload: Buffer | null): Promise<number> {
    const g = payload && decodeGeneration(payload);
    const meta = t.lun.meta;
    if (!g || !meta) return EINVAL;
    await t.lun.backing.flush();
    await meta.adopt(g.current, g.history);
    await t.lun.undo?.discard();
    this.log.info('secondary caught up with the primary', { lun: t.lun.name, generation: g.current });
    return 0;
  }

  private answer(reqId: number, errno: number, data?: Buffer): void {
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

