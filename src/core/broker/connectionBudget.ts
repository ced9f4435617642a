/**
 * A cap on the broker's client connections, kept by closing idle ones, oldest first.
 *
 * Every connection holds a file descriptor, and so does every upstream socket. A local process
 * that opens thousands of connections and sends nothing (or one request, then keeps the
 * connection alive) would otherwise use up the process's descriptors: the broker could then
 * neither accept an agent's request nor open an upstream socket for it. Past the budget, each new
 * connection closes the connection that has been idle longest (one that never sent a request, or
 * sits between keep-alive requests). Connections with a request in flight, and WebSockets, are
 * never closed for this.
 */
import { readFileSync } from 'node:fs';
import type * as http from 'node:http';
import * as https from 'node:https';
import type { Socket } from 'node:net';

/** The soft limit on open files of this process (Linux: /proc/self/limits; elsewhere a common value). */
function openFileLimit(): number {
  if (process.platform === 'linux') {
    try {
      const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
      if (m) return m[1] === 'unlimited' ? 1_048_576 : Number(m[1]);
    } catch {
      // no /proc: fall through
    }
  }
  return 4096;
}

/**
 * How many client connections may be open: half of what the descriptor limit leaves after a
 * reserve for files, the keychain and the like, since each client request may hold an upstream
 * socket too. 448 under the common limit of 1,024.
 */
function connectionBudget(fileLimit = openFileLimit()): number {
  return Math.max(32, Math.min(100_000, Math.floor((fileLimit - 128) / 2)));
}

/** Tracks a server's client connections and closes the longest-idle one when there are too many. */
export class ConnectionBudget {
  private readonly all = new Set<Socket>();
  /** Idle connections, longest idle first (a Set keeps insertion order). */
  private readonly idle = new Set<Socket>();
  /** Requests in flight per connection (more than one when a client pipelines). */
  private readonly busy = new Map<Socket, number>();

  constructor(readonly budget = connectionBudget()) {}

  /** Follows `server`'s connections, requests and upgrades. */
  watch(server: http.Server): void {
    // Over TLS, requests come on the TLS socket, which exists once the handshake is done.
    server.on(server instanceof https.Server ? 'secureConnection' : 'connection', (socket: Socket) => this.opened(socket));
    server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
      const socket = req.socket;
      this.idle.delete(socket);
      this.busy.set(socket, (this.busy.get(socket) ?? 0) + 1);
      res.once('close', () => this.rested(socket));
    });
    server.on('upgrade', (req: http.IncomingMessage) => this.idle.delete(req.socket));
  }

  private opened(socket: Socket): void {
    this.all.add(socket);
    this.idle.add(socket);
    socket.once('close', () => {
      this.all.delete(socket);
      this.idle.delete(socket);
      this.busy.delete(socket);
    });
    if (this.all.size <= this.budget) return;
    const oldest = this.idle.values().next().value;
    if (oldest === undefined || oldest === socket) return;
    this.idle.delete(oldest);
    oldest.destroy();
  }

  /** A request on `socket` was answered: once none is left, the connection waits for the next one. */
  private rested(socket: Socket): void {
    const left = (this.busy.get(socket) ?? 1) - 1;
    if (left > 0) return void this.busy.set(socket, left);
    this.busy.delete(socket);
    if (!socket.destroyed && this.all.has(socket)) this.idle.add(socket);
  }
}
