// Client network lists ("10.0.0.0/8", "::1/128", or a bare address for one host).
import net from 'node:net';

export interface Cidr { address: string; prefix: number; family: 'ipv4' | 'ipv6' }

export function parseCidr(text: string): Cidr | null {
  const [address, bits, extra] = text.split('/');
  if (extra !== undefined) return null;
  const version = net.isIP(address);
  if (version === 0) return null;
  const max = version === 4 ? 32 : 128;
  const prefix = bits === undefined ? max : /^\d{1,3}$/.test(bits) ? Number(bits) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return null;
  return { address, prefix, family: version === 4 ? 'ipv4' : 'ipv6' };
}

/** A predicate over remote addresses; an empty list allows everyone. */
export function allowList(cidrs: readonly string[]): ((address: string | undefined) => boolean) | null {
  if (cidrs.length === 0) return null;
  const list = new net.BlockList();
  for (const text of cidrs) {
    const c = parseCidr(text);
    if (!c) throw new Error(`not a CIDR: ${text}`);
    list.addSubnet(c.address, c.prefix, c.family);
  }
  return (address) => {
    if (!address) return false;
    // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    const v4 = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
    if (v4) return list.check(v4[1], 'ipv4');
    return list.check(address, net.isIP(address) === 6 ? 'ipv6' : 'ipv4');
  };
}
