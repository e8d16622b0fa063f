// Admin HTTP endpoint (loopback by default): GET /status returns the JSON behind `nbd-mirror status`.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { listenOn } from '../net/listen.js';

export type StatusSource = () => unknown;
export type MetricsSource = () => Promise<string>;

export class AdminServer {
  private readonly server: http.Server;

  constructor(private readonly status: StatusSource, private readonly metrics: MetricsSource) {
    this.server = http.createServer((req, res) => this.route(req, res));
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://admin');
    if (req.method !== 'GET') return send(res, 405, { error: 'method not allowed' });
    if (url.pathname === '/status') return send(res, 200, this.status());
    if (url.pathname === '/metrics') {
      this.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
          res.end(text);
        },
        (err: Error) => send(res, 500, { error: err.message }),
      );
      return;
    }
    send(res, 404, { error: `no such endpoint ${url.pathname}` });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

function send(res: http.ServerResponse, code: number, body: unknown): void {
  const text = JSON.stringify(body, null, 2) + '\n';
  res.writeHead(code, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
