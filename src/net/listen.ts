// Bind a TCP/HTTP server and resolve with its address, or reject (EADDRINUSE, EACCES, ...).
import type { AddressInfo } from 'node:net';

interface Listenable {
  once(event: 'error', cb: (err: Error) => void): unknown;
  off(event: 'error', cb: (err: Error) => void): unknown;
  listen(port: number, host: string, cb: () => void): unknown;
  address(): AddressInfo | string | null;
}

export function listenOn(server: Listenable, host: string, port: number): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server.address() as AddressInfo);
    });
  });
}
