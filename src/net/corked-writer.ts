// Writes issued in one event-loop turn leave the socket in one writev. On loopback each socket
// write runs the receiver's TCP path inline, so fewer writes is much less CPU. The one writer
// both wires (NBD replies, mirror requests and replies) use.
import type { Socket } from 'node:net';

export class CorkedWriter {
  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(private readonly socket: Socket) {}

  write(buf: Buffer): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    this.socket.write(buf);
  }
}
