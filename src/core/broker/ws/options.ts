/** What the WebSocket proxy and its sessions are given by the broker. */
import type * as http from 'node:http';
import type { AuditLog } from '../../audit/audit';
import type { ConversationSizes } from '../../holds/contexts';
import type { TillEvents } from '../../events';
import type { TillKeys } from '../../keys/keys';
import type { PriceTable } from '../../metering/pricing';
import type { Provider, ProviderRegistry } from '../../providers/providers';
import type { CredentialForms } from '../scrub';

export interface WebSocketProxyOptions {
  keys: TillKeys;
  providers: ProviderRegistry;
  prices: PriceTable;
  events: TillEvents;
  audit?: AuditLog;
  /** Reads a credential from the vault (the broker's cache). */
  secretFor(credential: string): Promise<string>;
  /** The forms of a credential to scrub from what the upstream sends (the broker's cache). */
  formsOf(secret: string): CredentialForms;
  /** The base URL clients of a provider use, for messages. */
  baseUrlFor(provider: Provider): string;
  /** What the broker ends when it closes: each connection adds its stop function while open. */
  open: Set<() => void>;
  /** What the upstream's stored conversations weigh, shared with HTTP (contexts.ts). */
  conversations: ConversationSizes;
  /** Serves an upgrade request that is not a WebSocket (e.g. `Upgrade: h2c`) as plain HTTP/1.1. */
  http(req: http.IncomingMessage, res: http.ServerResponse): void;
  /** Non-loopback names the Host header may carry (listener.ts); undefined: loopback names only. */
  allowedHosts: ReadonlySet<string> | undefined;
  /** Largest message a client may send. Default: 32 MiB (the HTTP body limit). */
  maxMessageBytes?: number;
  /** Largest message an upstream may send. Default: 64 MiB. */
  maxUpstreamMessageBytes?: number;
  /** Time the upstream has to accept the WebSocket. Default: 30 s. */
  handshakeTimeoutMs?: number;
  /** Bytes queued towards one side above which the other side is no longer read. Default: 1 MiB. */
  highWaterBytes?: number;
  /** Where diagnostic lines go. Never given a secret. */
  log?: (line: string) => void;
}

/** The options with their defaults filled in. */
export type ProxyOptions = Required<Omit<WebSocketProxyOptions, 'audit' | 'log' | 'allowedHosts'>> &
  Pick<WebSocketProxyOptions, 'audit' | 'log' | 'allowedHosts'>;
