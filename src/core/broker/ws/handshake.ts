/** What the proxy and its sessions share about a WebSocket handshake: the key subprotocol, and HTTP answers on a socket not upgraded. */
import * as http from 'node:http';
import type { Duplex } from 'node:stream';

/** The browser-style subprotocol OpenAI Realtime accepts a key in: `openai-insecure-api-key.<key>`. */
export const KEY_PROTOCOL = 'openai-insecure-api-key.';
/** An HTTP token (RFC 9110): what a subprotocol name may be. */
export const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** Writes an HTTP answer on a socket that was never upgraded, then closes it. */
export function writeResponse(socket: Duplex, status: number, headers: Record<string, string | number>, body: string | Buffer): void {
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  const head = [
    `HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? 'Unknown'}`,
    ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`),
  ].join('\r\n');
  socket.once('finish', () => socket.destroy());
  socket.end(Buffer.concat([Buffer.from(`${head}\r\n\r\n`), Buffer.isBuffer(body) ? body : Buffer.from(body)]));
}
