/**
 * What the broker needs of a ledger, local (ledger.ts: one journal file, answers at once) or
 * shared by a team (postgres.ts: one database, answers after a round trip). Both keep the same
 * guarantees: a hold is checked and taken atomically against the key's limits, a growth too; what
 * was acknowledged survives a crash; a hold open at a crash counts as spent.
 */
import type { Maybe } from '../maybe';
import { hasLimits, limitsOf, type Amounts, type Meter, type Policy } from '../policy/policy';

/** A till key as stored. Never holds the key itself, only its hash. */
export interface KeyRecord {
  id: string;
  hash: string;
  label: string;
  provider: string;
  /** Name of the credential the key is bound to. */
  credential: string;
  createdAt: number;
  /** Who asked for the key (`vscode:<session>`, `cli`, …). */
  owner?: string;
  policy: Policy;
  revokedAt?: number;
  /** Spent amounts, settled from finished requests. */
  used: Amounts;
  /** Tokens by kind, from the upstreams' usage reports (or estimates). */
  tokens?: TokenCounts;
  /** The part of `used.spend` (micro-dollars) that was estimated, not reported. */
  estimatedSpend?: number;
  /** Settled requests to a model without a price: their tokens are counted, their dollars unknown. */
  unpriced?: number;
  /** Tied to the life of the process that holds its lease (`till exec`): see leases.ts. */
  leased?: true;
}

/** Tokens by kind. Input includes cached; output includes reasoning. */
export interface TokenCounts {
  input: number;
  output: number;
  cached: number;
  reasoning: number;
}

/** What a settled request adds to a key besides its meters. */
export interface SettleDetails {
  tokens?: TokenCounts;
  /** The spend was estimated (an interrupted stream with no usage report). */
  estimated?: boolean;
  /** The model has no price: the request's dollars are unknown (not zero). */
  unpriced?: boolean;
}

/**
 * A hold on part of a key's limits for one request in flight: the object the ledger keeps while
 * it is open, so its amounts are what it holds now (changed only by {@link Ledger.adjust}).
 */
export interface LedgerHold {
  readonly id: number;
  readonly keyId: string;
  amounts: Amounts;
}

/** Why a hold was refused: the meter, and how much is used and held. */
export interface HoldRefusal {
  meter: Meter;
  limit: number;
  used: number;
  reserved: number;
}

/**
 * A hold refused because the key's requests in flight, across every broker of a shared ledger,
 * are at its concurrency limit (the local ledger leaves concurrency to the broker's own count).
 */
export interface BusyRefusal {
  concurrency: number;
}

/** A hold refused because the key's requests of the last minute, across every broker, are at its rate limit. */
export interface RateRefusal {
  rpm: number;
  /** Seconds until the oldest of them leaves the minute. */
  retryAfter: number;
}

/** What a ledger answers a hold with: the hold, or why not. */
export type HoldAnswer = LedgerHold | HoldRefusal | BusyRefusal | RateRefusal;

/** True for a hold taken (not a refusal of any kind). */
export function isHeld(value: HoldAnswer): value is LedgerHold {
  return 'id' in value && 'keyId' in value;
}

/** True when a value is a refusal of a limit (calls, tokens, dollars) rather than a hold. */
export function isRefusal(value: HoldAnswer): value is HoldRefusal {
  return 'meter' in value && 'limit' in value;
}

/** The first meter on which `extra` more would take `key` past its limit, with the figures; undefined when it fits. */
export function overLimit(key: KeyRecord, reserved: Amounts, extra: Amounts): HoldRefusal | undefined {
  if (!hasLimits(key.policy)) return undefined;
  const limits = limitsOf(key.policy);
  for (const meter of Object.keys(extra) as Meter[]) {
    const limit = limits[meter];
    if (limit === undefined) continue;
    const used = key.used[meter] ?? 0;
    const held = reserved[meter] ?? 0;
    if (used + held + extra[meter]! > limit) return { meter, limit, used, reserved: held };
  }
  return undefined;
}

export interface KeyLedger {
  /** The keys, as last seen (a shared ledger's other brokers' changes arrive by notification). */
  keys(): KeyRecord[];
  get(id: string): KeyRecord | undefined;
  /** Amounts held by requests in flight. */
  reserved(id: string): Amounts;
  addKey(key: KeyRecord): Maybe<void>;
  updatePolicy(id: string, policy: Policy): Maybe<void>;
  /** False when it was already revoked or is unknown. */
  revoke(id: string, at?: number): Maybe<boolean>;
  /** `batch`: the local ledger may write the hold with the turn's others (see {@link whenDurable}). */
  hold(keyId: string, amounts: Amounts, batch?: boolean): Maybe<HoldAnswer>;
  resize(hold: LedgerHold, amounts: Amounts): Maybe<HoldRefusal | undefined>;
  settle(hold: LedgerHold, actual?: Amounts, details?: SettleDetails): Maybe<unknown>;
  release(hold: LedgerHold): Maybe<unknown>;
  /** Runs `then` once every hold taken so far is durable. */
  whenDurable(then: () => void): void;
  /**
   * Reads a key this broker has not heard of yet (issued through another broker a moment ago).
   * Only a shared ledger has it; undefined when the key does not exist.
   */
  find?(id: string): Promise<KeyRecord | undefined>;
  /** Keys changed elsewhere (another broker revoked or extended one). Only a shared ledger has them. */
  onKeyChanged?(listener: (key: KeyRecord) => void): () => void;
  /** True when holds are answered after a round trip: streams grow their holds ahead (streamHold.ts). */
  readonly shared?: boolean;
  close(): Maybe<void>;
}
