// Fixed-newstyle handshake and option haggling, up to the start of transmission.
// Hostile input (bad magic, unknown client flags, oversized options) ends the connection;
// malformed but well-framed options get an error reply and negotiation goes on. STARTTLS swaps
// the socket for a TLS one mid-negotiation; the Session names the socket transmission runs on.
import type { Socket } from 'node:net';
import type { Lun } from '../lun/lun.js';
import type { LunRegistry } from '../lun/registry.js';
import {
  CLIENT_FLAGS_KNOWN, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, MAX_OPTION_LENGTH, MAX_PAYLOAD,
  MAX_STRING, META_BASE_ALLOCATION, META_CONTEXT_ID_BASE_ALLOCATION, MIN_BLOCK_SIZE, NBDMAGIC, OPT,
  PREFERRED_BLOCK_SIZE, REP, REPLY_MAGIC_OPT, TFLAG,
} from './constants.js';
import {
  clientFlags, encode, exportNameReply, greeting, infoBlockSize, infoExport, optionHeader, optionReplyHeader,
} from './layouts.js';
import { SocketReader } from '../net/socket-reader.js';

/** What transmission needs from a finished negotiation. */
export interface Session {
  /** The connection's socket from now on: the TLS socket when STARTTLS upgraded it. */
  socket: Socket;
  lun: Lun;
  exportFlags: number;
  structured: boolean;
  /** base:allocation was selected by SET_META_CONTEXT for this export. */
  baseAllocation: boolean;
  /** Bytes the client pipelined after its last option. */
  leftover: Buffer;
}

/** Negotiation ended without an export (client aborted, hung up, or broke the protocol). */
export class NegotiationEnded extends Error {}

export interface HandshakeContext {
  luns: LunRegistry;
  /** True once the server is shutting down: options get ERR_SHUTDOWN. */
  isShuttingDown(): boolean;
  /** STARTTLS; absent when listen.tls is off (the option is then unsupported). */
  tls?: HandshakeTls | null;
  /** An export was hidden from this client by its allowedNetworks (once per export and connection). */
  onRefused?(lun: string, option: number): void;
}

export interface HandshakeTls {
  /** listen.tls "require" (FORCEDTLS): every option but STARTTLS and ABORT waits for TLS. */
  required: boolean;
  /**
   * Upgrade the socket after NBD_REP_ACK: the TLS socket must exist when this returns (before
   * any await), and the promise settles once the client is authenticated.
   */
  upgrade(socket: Socket): Promise<Socket>;
}

export function transmissionFlags(lun: Lun, structured: boolean): number {
  let flags = TFLAG.HAS_FLAGS | TFLAG.SEND_FLUSH | TFLAG.SEND_CACHE | TFLAG.CAN_MULTI_CONN;
  if (structured) flags |= TFLAG.SEND_DF;
  if (lun.readOnly) flags |= TFLAG.READ_ONLY;
  else flags |= TFLAG.SEND_FUA | TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES | TFLAG.SEND_FAST_ZERO;
  return flags;
}

class Negotiation {
  private reader: SocketReader;
  private socket: Socket;
  /** Taken before any upgrade: what allowedNetworks are checked against. */
  private readonly address: string | undefined;
  private fixed = false;
  private secure = false;
  private readonly refused = new Set<string>();
  private noZeroes = false;
  private structured = false;
  private metaExport: string | null = null;  // export name SET_META_CONTEXT applied to
  private baseAllocation = false;

  constructor(socket: Socket, private readonly ctx: HandshakeContext) {
    this.socket = socket;
    this.address = socket.remoteAddress;
    this.reader = new SocketReader(socket);
  }

  async run(): Promise<Session> {
    try {
      return await this.haggle();
    } catch (err) {
      this.reader.detach();
      throw err;
    }
  }

  private async haggle(): Promise<Session> {
    this.socket.write(encode(greeting, {
      magic: NBDMAGIC, optMagic: IHAVEOPT, flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }));
    const { flags } = clientFlags.decode(await this.reader.read(clientFlags.span));
    if (flags & ~CLIENT_FLAGS_KNOWN) throw new NegotiationEnded(`unknown client flags 0x${flags.toString(16)}`);
    this.noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
    // TLS needs fixed newstyle; without it the spec leaves a server no way to insist on TLS.
    this.fixed = (flags & FLAG_FIXED_NEWSTYLE) !== 0;
    if (this.ctx.tls?.required && !this.fixed) throw new NegotiationEnded('TLS required, and the client does not speak fixed newstyle');

    for (;;) {
      const hdr = optionHeader.decode(await this.reader.read(optionHeader.span));
      if (!hdr.magic.equals(IHAVEOPT)) throw new NegotiationEnded('bad option magic');
      if (hdr.length > MAX_OPTION_LENGTH) throw new NegotiationEnded(`option ${hdr.option} of ${hdr.length} bytes`);
      const data = hdr.length ? await this.reader.read(hdr.length) : Buffer.alloc(0);

      if (this.ctx.isShuttingDown() && hdr.option !== OPT.ABORT) {
        // EXPORT_NAME has no option reply (the client would read one as the export size): just close.
        if (hdr.option !== OPT.EXPORT_NAME) this.reply(hdr.option, REP.ERR_SHUTDOWN);
        throw new NegotiationEnded('server shutting down');
      }
      if (hdr.option === OPT.STARTTLS) {
        await this.startTls(data);
        continue;
      }
      if (this.ctx.tls?.required && !this.secure && hdr.option !== OPT.ABORT) {
        // FORCEDTLS: nothing is revealed before TLS. EXPORT_NAME cannot be answered with an error.
        if (hdr.option === OPT.EXPORT_NAME) throw new NegotiationEnded('NBD_OPT_EXPORT_NAME without TLS, which is required');
        this.reply(hdr.option, REP.ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
        continue;
      }
      const session = this.option(hdr.option, data);
      if (session) return session;
    }
  }

  private async startTls(data: Buffer): Promise<void> {
    const tls = this.ctx.tls;
    if (!tls || !this.fixed) return this.reply(OPT.STARTTLS, REP.ERR_UNSUP, 'TLS is not offered');
    if (this.secure) return this.reply(OPT.STARTTLS, REP.ERR_INVALID, 'TLS is already established');
    if (data.length !== 0) return this.reply(OPT.STARTTLS, REP.ERR_INVALID, 'STARTTLS takes no data');
    // A client must wait for our ACK before its TLS hello: plain bytes already here would otherwise
    // pass for TLS-protected ones (the classic STARTTLS injection).
    if (this.reader.detach().length !== 0) throw new NegotiationEnded('data pipelined after NBD_OPT_STARTTLS');
    this.reply(OPT.STARTTLS, REP.ACK);
    this.socket = await tls.upgrade(this.socket);
    this.reader = new SocketReader(this.socket);
    this.secure = true;
    // The spec: nothing negotiated before STARTTLS survives it.
    this.structured = false;
    this.metaExport = null;
    this.baseAllocation = false;
  }

  /** The export `name` names, if this client may see it (allowedNetworks). */
  private visible(name: string, option: number): Lun | undefined {
    const lun = this.ctx.luns.find(name);
    if (!lun || lun.allows(this.address)) return lun;
    if (!this.refused.has(lun.name)) {
      this.refused.add(lun.name);
      this.ctx.onRefused?.(lun.name, option);
    }
    return undefined;
  }

  /** Handle one option; returns a Session when transmission starts. */
  private option(option: number, data: Buffer): Session | null {
    switch (option) {
      case OPT.EXPORT_NAME: return this.exportName(data);
      case OPT.ABORT:
        if (data.length === 0) this.reply(option, REP.ACK);
        else this.reply(option, REP.ERR_INVALID, 'ABORT takes no data');
        throw new NegotiationEnded('client aborted');
      case OPT.LIST: this.list(data); return null;
      case OPT.INFO:
      case OPT.GO: return this.infoOrGo(option, data);
      case OPT.STRUCTURED_REPLY: this.structuredReply(data); return null;
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: this.metaContext(option, data); return null;
      default:
        this.reply(option, REP.ERR_UNSUP, `option ${option} not supported`);
        return null;
    }
  }

  private exportName(data: Buffer): Session {
    const lun = this.visible(data.toString('utf8'), OPT.EXPORT_NAME);
    // EXPORT_NAME has no way to report an error but to close the connection.
    if (!lun) throw new NegotiationEnded(`unknown export ${JSON.stringify(data.toString('utf8'))}`);
    const flags = transmissionFlags(lun, this.structured);
    const reply = encode(exportNameReply, { size: lun.size, flags });
    this.socket.write(this.noZeroes ? reply : Buffer.concat([reply, Buffer.alloc(124)]));
    return this.session(lun, flags);
  }

  private list(data: Buffer): void {
    if (data.length !== 0) return this.reply(OPT.LIST, REP.ERR_INVALID, 'LIST takes no data');
    for (const lun of this.ctx.luns.all()) {
      if (!lun.allows(this.address)) continue;
      const name = Buffer.from(lun.name, 'utf8');
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      this.reply(OPT.LIST, REP.SERVER, Buffer.concat([payload, Buffer.from(lun.description, 'utf8')]));
    }
    this.reply(OPT.LIST, REP.ACK);
  }

  private infoOrGo(option: number, data: Buffer): Session | null {
    const parsed = parseInfoRequest(data);
    if (!parsed) {
      this.reply(option, REP.ERR_INVALID, 'malformed INFO/GO request');
      return null;
    }
    // A hidden export gets exactly the answer of a missing one (ERR_UNKNOWN, not ERR_POLICY):
    // a client outside allowedNetworks does not learn which names exist.
    const lun = this.visible(parsed.name, option);
    if (!lun) {
      this.reply(option, REP.ERR_UNKNOWN, `no export named ${JSON.stringify(parsed.name)}`);
      return null;
    }
    const flags = transmissionFlags(lun, this.structured);
    this.reply(option, REP.INFO, encode(infoExport, { type: INFO.EXPORT, size: lun.size, flags }));
    for (const type of new Set(parsed.requests)) {
      if (type === INFO.NAME) {
        this.reply(option, REP.INFO, Buffer.concat([u16(INFO.NAME), Buffer.from(lun.name, 'utf8')]));
      } else if (type === INFO.DESCRIPTION && lun.description) {
        this.reply(option, REP.INFO, Buffer.concat([u16(INFO.DESCRIPTION), Buffer.from(lun.description, 'utf8')]));
      }
    }
    // Always advertised: any alignment works, so a client that did not ask loses nothing.
    this.reply(option, REP.INFO, encode(infoBlockSize, {
      type: INFO.BLOCK_SIZE, min: MIN_BLOCK_SIZE, preferred: PREFERRED_BLOCK_SIZE, max: MAX_PAYLOAD,
    }));
    this.reply(option, REP.ACK);
    return option === OPT.GO ? this.session(lun, flags) : null;
  }

  private structuredReply(data: Buffer): void {
    if (data.length !== 0) return this.reply(OPT.STRUCTURED_REPLY, REP.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
    if (this.structured) return this.reply(OPT.STRUCTURED_REPLY, REP.ERR_INVALID, 'structured replies already negotiated');
    this.structured = true;
    this.reply(OPT.STRUCTURED_REPLY, REP.ACK);
  }

  private metaContext(option: number, data: Buffer): void {
    const req = parseMetaContextRequest(data);
    if (!req) return this.reply(option, REP.ERR_INVALID, 'malformed meta context request');
    if (!this.structured) return this.reply(option, REP.ERR_INVALID, 'structured replies not negotiated');
    if (!this.visible(req.exportName, option)) {
      return this.reply(option, REP.ERR_UNKNOWN, `no export named ${JSON.stringify(req.exportName)}`);
    }
    const set = option === OPT.SET_META_CONTEXT;
    // LIST with no queries means "all contexts"; "base:" names the whole base namespace.
    const matches = set
      ? req.queries.includes(META_BASE_ALLOCATION)
      : req.queries.length === 0 || req.queries.some((q) => q === META_BASE_ALLOCATION || q === 'base:');
    if (set) {
      this.metaExport = req.exportName;
      this.baseAllocation = matches;
    }
    if (matches) {
      const name = Buffer.from(META_BASE_ALLOCATION, 'utf8');
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(set ? META_CONTEXT_ID_BASE_ALLOCATION : 0, 0);
      name.copy(payload, 4);
      this.reply(option, REP.META_CONTEXT, payload);
    }
    this.reply(option, REP.ACK);
  }

  private session(lun: Lun, exportFlags: number): Session {
    // Contexts chosen for another export do not carry over (the default export "" is the first LUN).
    const metaLun = this.metaExport === null ? null : this.ctx.luns.find(this.metaExport);
    const baseAllocation = this.baseAllocation && metaLun === lun;
    return {
      socket: this.socket, lun, exportFlags, structured: this.structured, baseAllocation, leftover: this.reader.detach(),
    };
  }

  private reply(option: number, type: number, payload?: Buffer | string): void {
    const data = typeof payload === 'string' ? Buffer.from(payload, 'utf8') : payload ?? Buffer.alloc(0);
    // Error strings are optional free text; cap them like every NBD string.
    const body = data.length > MAX_STRING && (type & 0x80000000) ? data.subarray(0, MAX_STRING) : data;
    this.socket.write(Buffer.concat([
      encode(optionReplyHeader, { magic: REPLY_MAGIC_OPT, option, type, length: body.length }), body,
    ]));
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** INFO/GO payload: u32 name length, name, u16 count, count × u16 info type. */
export function parseInfoRequest(data: Buffer): { name: string; requests: number[] } | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) return null;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * count) return null;
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, requests };
}

/** LIST/SET_META_CONTEXT payload: u32 name length, name, u32 count, count × (u32 length, query). */
export function parseMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } | null {
  if (data.length < 8) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) return null;
  const exportName = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  let at = 4 + nameLen + 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return null;
    const len = data.readUInt32BE(at);
    if (len > MAX_STRING || at + 4 + len > data.length) return null;
    queries.push(data.toString('utf8', at + 4, at + 4 + len));
    at += 4 + len;
  }
  return at === data.length ? { exportName, queries } : null;
}

export function negotiate(socket: Socket, ctx: HandshakeContext): Promise<Session> {
  return new Negotiation(socket, ctx).run();
}
