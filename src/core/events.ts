/**
 * Typed events the broker emits, for `till watch` now and the VS Code views later.
 * Events carry ids, labels and numbers; never a key or a credential.
 */
import { EventEmitter } from 'node:events';
import type { Amounts, Meter } from './policy/policy';
import type { KeyState } from './ledger/ledger';

/** A key as shown to people and tools: everything but its hash. */
export interface KeySummary {
  id: string;
  label: string;
  provider: string;
  credential: string;
  createdAt: number;
  state: KeyState;
  policy: import('./policy/policy').Policy;
  used: Amounts;
  reserved: Amounts;
  /** What is left of each limited meter. */
  remaining: Amounts;
  inFlight: number;
  revokedAt?: number;
  /** Who asked for the key (`vscode:<session>`, `cli`, …). */
  owner?: string;
  /** Revoked when the process holding its lease goes away (`till exec`). */
  leased?: true;
  /** Tokens by kind (input includes cached, output includes reasoning). */
  tokens: import('./ledger/ledger').TokenCounts;
  /** The part of `used.spend` (micro-dollars) that was estimated from an interrupted stream. */
  estimatedSpend: number;
  /**
   * The same money in US dollars, for people and scripts: spent (null when unknown: some
   * requests went to a model without a price), of which priced and estimated, held by requests
   * in flight, and how many requests are unpriced (their tokens are counted all the same).
   */
  spend: { usd: number | null; pricedUsd: number; estimatedUsd: number; reservedUsd: number; unpricedRequests: number; limitUsd?: number };
}

/** What one finished request used. */
export interface RequestUsage {
  tokens: import('./ledger/ledger').TokenCounts;
  /** Micro-dollars; absent when the model has no price. */
  spend?: number;
  /** Estimated from the streamed text (the stream was cut before the upstream reported usage). */
  estimated: boolean;
}

export interface RequestInfo {
  requestId: string;
  keyId: string;
  label: string;
  provider: string;
  method: string;
  path: string;
  model?: string;
  billable: boolean;
}

export type TillEvent =
  | { type: 'key.issued'; at: number; key: KeySummary }
  | { type: 'key.revoked'; at: number; key: KeySummary }
  | { type: 'key.exhausted'; at: number; key: KeySummary; /** The limit that ran out. */ meter: Meter }
  | { type: 'key.expired'; at: number; key: KeySummary }
  | { type: 'key.extended'; at: number; key: KeySummary }
  | { type: 'limit.near'; at: number; key: KeySummary; meter: Meter; used: number; limit: number; /** 50 or 80. */ percent: number }
  | {
      type: 'request.started';
      at: number;
      request: RequestInfo;
      /** What the request holds of its key's limits, and what bounds its input (budgeted keys). */ held?: Amounts;
      basis?: string;
    }
  /** An open stream's running usage (at most twice a second), so views can show its cost as it grows. */
  | {
      type: 'request.progress';
      at: number;
      request: RequestInfo;
      usage: RequestUsage;
      /** What the request holds of its key's limits now (it follows an open stream). */ held?: Amounts;
    }
  | {
      type: 'request.finished';
      at: number;
      request: RequestInfo;
      status: number;
      latencyMs: number;
      aborted?: string;
      /** Tokens and spend, for metered requests. */ usage?: RequestUsage;
      /** Set when nothing was counted (the request never reached the upstream): it is not a call. */ uncounted?: true;
    }
  | {
      type: 'request.denied';
      at: number;
      request: Partial<RequestInfo> & { provider: string; method: string; path: string };
      status: number;
      reason: string;
      code: DenialCode;
    };

export type TillEventType = TillEvent['type'];

/** Machine-readable denial reasons, also used in audit records. */
export type DenialCode =
  | 'missing_key'
  | 'malformed_key'
  | 'unknown_key'
  | 'revoked'
  | 'expired'
  | 'exhausted'
  /** A team ledger's database could not be reached: refused, nothing held or sent. */
  | 'ledger_unavailable'
  | 'rate_limited'
  | 'concurrency'
  | 'out_of_scope'
  | 'wrong_provider'
  | 'bad_request'
  | 'forbidden_host'
  | 'browser_origin'
  | 'too_large'
  | 'credential_unavailable'
  | 'upstream_unreachable'
  | 'unknown_provider'
  /** A fault of Till's own (logged); the request was not forwarded. */
  | 'internal_error';

/**
 * Whether an event may change a key's counters or state. Denials and a stream's running usage
 * change none; progress comes twice a second per stream, so views skip re-reading keys for it.
 */
export function changesKeys(e: TillEvent): boolean {
  return e.type !== 'request.denied' && e.type !== 'request.progress';
}

/** How often an open request's running usage is announced (`request.progress`), at most. */
export const PROGRESS_MS = 500;

/**
 * Whether an open request (HTTP stream or WebSocket turn) is due to announce its running usage:
 * its last `request.progress` was {@link PROGRESS_MS} ago or more. `last` is the request's own
 * clock, moved on when it is due. Checked before anything is built: it runs for every chunk.
 */
export function progressDue(last: { at: number }): boolean {
  const now = performance.now();
  if (now - last.at < PROGRESS_MS) return false;
  last.at = now;
  return true;
}

/** The `request.progress` of an open request: what it used so far, and what it holds of its key's limits. */
export function progressEvent(request: RequestInfo, usage: RequestUsage, held: Amounts | undefined): TillEvent {
  const event: Extract<TillEvent, { type: 'request.progress' }> = { type: 'request.progress', at: Date.now(), request, usage };
  if (held) event.held = held;
  return event;
}

/** A typed event bus. Listeners that throw do not break the broker. */
export class TillEvents {
  private readonly emitter = new EventEmitter();

  constructor() {
    this.emitter.setMaxListeners(0);
  }

  emit(event: TillEvent): void {
    this.emitter.emit('event', event);
  }

  /** Subscribes to every event; returns the unsubscribe function. */
  on(listener: (event: TillEvent) => void): () => void {
    const safe = (e: TillEvent) => {
      try {
        listener(e);
      } catch {
        // a view's bug must not stop the broker
      }
    };
    this.emitter.on('event', safe);
    return () => {
      this.emitter.off('event', safe);
    };
  }
}

/** A request that ended (served or denied), as kept for views that open later. */
export type RequestRecord = Extract<TillEvent, { type: 'request.finished' | 'request.denied' }>;
