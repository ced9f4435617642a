/**
 * Till keys at run time: issue, authenticate, rate and concurrency limits, holds,
 * revocation of in-flight requests, and the key events. The HTTP broker asks; this decides.
 */
import { isDenial, type Denial } from '../denial';
import type { KeySummary, TillEvents } from '../events';
import { isRefusal, keyState, type KeyRecord, type LedgerHold, type HoldRefusal, type SettleDetails } from '../ledger/ledger';
import type { HoldAnswer, KeyLedger } from '../ledger/keyLedger';
import { andThen, type Maybe } from '../maybe';
import type { InFlightEntry } from './inFlightList';
import { buildPolicy, hasLimits, limitsOf, MICROS, type Amounts, type Meter, type Policy } from '../policy/policy';
import { formatAmount, limitRefusal } from './present';
import { InFlightList } from './inFlightList';
import { hashTillKey, makeTillKey, newKeyId, parseTillKey, tillKeyMatches } from './tillKey';

/** Something in flight for a key that revocation must end. */
export interface InFlight {
  /** Ends the request at once, telling the client why when it still can. */
  cut(denial: Denial): void;
}

/**
 * A request admitted by {@link TillKeys.admit}, and its hold on the key's limits: the one place
 * where a hold is taken (at admission), grown or shrunk while the request runs, and settled or
 * released at its end, for HTTP requests and every WebSocket dialect alike. End it exactly once
 * with `done`.
 */
export interface Hold {
  /** Marks the request as having reached the upstream (its hold becomes spending). */
  reachedUpstream(): void;
  /**
   * Holds `amounts` instead from now on, atomically against the key's limits (a growth is on disk
   * before this returns). When the key cannot cover a growth, nothing changes and the meter that
   * is short is returned (see {@link growthRefusal}).
   */
  resize(amounts: Amounts): Maybe<HoldRefusal | undefined>;
  /** What it holds now. */
  held(): Amounts;
  /**
   * Ends the request's hold on the key, and frees its concurrency slot: settles to `actual`
   * (default: what it holds) if it reached the upstream, else releases.
   */
  settle(actual?: Amounts, details?: SettleDetails): void;
}

/** What `extend` adds to a key's limits (a limit the key does not have stays unlimited). */
export interface Extension {
  uses?: number;
  maxTokens?: number;
  /** US dollars. */
  maxSpend?: number;
}

export interface IssueRequest {
  provider: string;
  credential: string;
  label?: string;
  /** Who asked for the key (e.g. `vscode:<session>`, `cli`), so the right window notifies about it. */
  owner?: string;
  policy: Policy;
  /** Revoke the key when the process holding its lease goes away (see leases.ts). */
  lease?: boolean;
}

/** Fractions of a limit at which the key's owner hears about it. 1 is exhaustion. */
const THRESHOLDS = [0.5, 0.8] as const;
const MINUTE = 60_000;

/** Why a request's hold was refused: what it asked for (`wanted`). */
function refusal(r: HoldRefusal, wanted: number): Denial {
  return limitRefusal(
    r.meter,
    { limit: r.limit, used: r.used, held: r.reserved },
    `this request needs ${formatAmount(r.meter, wanted)}`,
    wanted,
  );
}

/** The denial for a growth of a hold the key could not cover ({@link Hold.resize}), and why it was needed. */
export function growthRefusal(r: HoldRefusal, why: string): Denial {
  return limitRefusal(r.meter, { limit: r.limit, used: r.used, held: r.reserved }, why);
}

/**
 * The denial for a key that was revoked or has expired, in that order (the states `keyState`
 * gives them); undefined for any other key. Exhaustion is for admission to judge.
 */
export function endedDenial(key: KeyRecord, now: number): Denial | undefined {
  if (key.revokedAt !== undefined) return { status: 401, code: 'revoked', message: `till key "${key.label}" was revoked` };
  if (key.policy.expiresAt !== undefined && now >= key.policy.expiresAt) {
    return { status: 401, code: 'expired', message: `till key "${key.label}" expired at ${new Date(key.policy.expiresAt).toISOString()}` };
  }
  return undefined;
}

/**
 * Issues, checks and limits till keys over a ledger: the local one, whose answers come at once
 * (and so do these), or a team's, whose changes and holds answer after a round trip ({@link Maybe}).
 */
export class TillKeys {
  /** Requests in flight by key (a list, not a Set: see inFlightList.ts). */
  private readonly inFlight = new Map<string, InFlightList<InFlight>>();
  /** Long-lived connections (WebSockets): cut by revocation, but not requests, so outside the concurrency count. */
  private readonly sessions = new Map<string, Set<InFlight>>();
  private readonly recent = new Map<string, number[]>();
  /** Presented keys already verified against their hash, to the key they name. */
  private readonly verified = new Map<string, KeyRecord>();
  private readonly announced = new Map<string, Set<string>>();
  private expiryTimer: NodeJS.Timeout | undefined;
  private readonly unsubscribe: (() => void) | undefined;

  constructor(
    private readonly ledger: KeyLedger,
    private readonly events: TillEvents,
    private readonly now: () => number = Date.now,
  ) {
    this.scheduleExpiry();
    // A team ledger: another broker revoked, extended or issued a key.
    this.unsubscribe = ledger.onKeyChanged?.((key) => this.changedElsewhere(key));
  }

  /** True when holds answer after a round trip (a team ledger): streams then grow their holds ahead (streamHold.ts). */
  get shared(): boolean {
    return this.ledger.shared === true;
  }

  /** A key changed on another broker: a revocation ends its requests here too; an expiry is rescheduled. */
  private changedElsewhere(key: KeyRecord): void {
    this.verified.clear();
    if (key.revokedAt !== undefined && this.once(key.id, 'revoked')) {
      this.cutAll(key);
      this.events.emit({ type: 'key.revoked', at: this.now(), key: this.summary(key) });
    }
    this.scheduleExpiry();
  }

  /** Issues a key. Returns the full key: the only time it exists outside the client. */
  issue(request: IssueRequest): Maybe<{ key: string; record: KeyRecord }> {
    const id = newKeyId();
    const key = makeTillKey(id);
    const record: KeyRecord = {
      id,
      hash: hashTillKey(key),
      label: request.label?.trim() || `${request.provider} key`,
      provider: request.provider,
      credential: request.credential,
      createdAt: this.now(),
      policy: request.policy,
      used: {},
    };
    if (request.owner) record.owner = request.owner;
    if (request.lease) record.leased = true;
    return andThen(this.ledger.addKey(record), () => {
      this.events.emit({ type: 'key.issued', at: record.createdAt, key: this.summary(record) });
      this.scheduleExpiry();
      return { key, record };
    });
  }

  /** Revokes a key and ends its in-flight requests and streams (on every broker of a team ledger). */
  revoke(id: string): Maybe<boolean> {
    return andThen(this.ledger.revoke(id, this.now()), (revoked) => {
      if (!revoked) return false;
      const record = this.ledger.get(id)!;
      this.once(id, 'revoked');
      this.cutAll(record);
      this.events.emit({ type: 'key.revoked', at: this.now(), key: this.summary(record) });
      return true;
    });
  }

  /** Ends every request and stream in flight for a key that has ended (revoked or expired). */
  private cutAll(key: KeyRecord): void {
    const denial = endedDenial(key, this.now());
    if (!denial) return;
    for (const flight of [...(this.inFlight.get(key.id)?.values() ?? []), ...(this.sessions.get(key.id) ?? [])]) flight.cut(denial);
  }

  /** Revokes every key that is not revoked yet; returns how many. */
  revokeAll(): Maybe<number> {
    const results = this.ledger.keys().map((key) => this.revoke(key.id));
    const count = (done: boolean[]) => done.filter(Boolean).length;
    if (!results.some((r) => r instanceof Promise)) return count(results as boolean[]);
    return Promise.all(results.map(async (r) => r)).then(count);
  }

  get(id: string): KeyRecord | undefined {
    return this.ledger.get(id);
  }

  list(): KeySummary[] {
    return this.ledger.keys().map((k) => this.summary(k));
  }

  summary(key: KeyRecord): KeySummary {
    const reserved = this.ledger.reserved(key.id);
    const summary: KeySummary = {
      id: key.id,
      label: key.label,
      provider: key.provider,
      credential: key.credential,
      createdAt: key.createdAt,
      state: keyState(key, this.now()),
      policy: key.policy,
      used: { activations: 0, ...key.used },
      tokens: { input: 0, output: 0, cached: 0, reasoning: 0, ...key.tokens },
      estimatedSpend: key.estimatedSpend ?? 0,
      spend: {
        usd: key.unpriced ? null : (key.used.spend ?? 0) / MICROS,
        pricedUsd: (key.used.spend ?? 0) / MICROS,
        estimatedUsd: (key.estimatedSpend ?? 0) / MICROS,
        reservedUsd: (reserved.spend ?? 0) / MICROS,
        unpricedRequests: key.unpriced ?? 0,
        ...(key.policy.maxSpendUsd !== undefined ? { limitUsd: key.policy.maxSpendUsd } : {}),
      },
      reserved: { ...reserved },
      remaining: this.remaining(key),
      inFlight: this.inFlight.get(key.id)?.size ?? 0,
    };
    if (key.revokedAt !== undefined) summary.revokedAt = key.revokedAt;
    if (key.owner !== undefined) summary.owner = key.owner;
    if (key.leased) summary.leased = true;
    return summary;
  }

  /**
   * Finds the key a presented till key names and checks it is usable. Constant-time hash
   * comparison; the denial never contains the presented value.
   */
  authenticate(presented: string): KeyRecord | Denial {
    // A key seen before skips the parse and the hash: only an exact, already verified
    // string hits, so this tells a guesser nothing the hash comparison would not.
    let key = this.verified.get(presented);
    if (!key) {
      const parsed = parseTillKey(presented);
      if (!parsed.ok) return { status: 400, code: 'malformed_key', message: parsed.reason };
      key = this.ledger.get(parsed.id);
      // Hash even when the id is unknown, so timing says nothing about which ids exist.
      const matches = tillKeyMatches(presented, key?.hash ?? '0'.repeat(64));
      if (!key || !matches)
        return {
          status: 401,
          code: 'unknown_key',
          message: 'unknown till key: it was never issued by this broker, or its ledger was replaced',
        };
      if (this.verified.size >= 10_000) this.verified.clear();
      this.verified.set(presented, key);
    }
    return endedDenial(key, this.now()) ?? key;
  }

  /**
   * Authenticates a presented key and checks it is bound to `provider`: the check every route
   * into the broker (HTTP and WebSocket) starts with. A denial after the lookup names the key.
   */
  authenticateFor(presented: string, provider: string): Authentication {
    const auth = this.authenticate(presented);
    if (isDenial(auth)) return { denial: auth };
    if (auth.provider !== provider) {
      return {
        denial: { status: 403, code: 'wrong_provider', message: `till key "${auth.label}" is for ${auth.provider}, not ${provider}` },
        key: auth,
      };
    }
    return { key: auth };
  }

  /**
   * {@link authenticateFor}, except that on a shared ledger a key this broker has not heard of
   * (issued through another broker a moment ago, its notification still on its way) is asked of the
   * ledger before it is refused. Synchronous, unless it must ask.
   */
  authenticateAnywhere(presented: string, provider: string): Maybe<Authentication> {
    const auth = this.authenticateFor(presented, provider);
    if (!('denial' in auth) || auth.denial.code !== 'unknown_key' || !this.shared) return auth;
    return this.findElsewhere(presented).then((found) => (found ? this.authenticateFor(presented, provider) : auth));
  }

  /** Asks the shared ledger for a key this broker has not heard of: true when it now exists here. */
  private async findElsewhere(presented: string): Promise<boolean> {
    const parsed = parseTillKey(presented);
    if (!parsed.ok || !this.ledger.find || this.ledger.get(parsed.id)) return false;
    try {
      return (await this.ledger.find(parsed.id)) !== undefined;
    } catch {
      return false;
    }
  }

  /**
   * Admits one request under the key's rate, concurrency and spending limits, atomically:
   * nothing else runs between the checks and the holds. Billable requests reserve one
   * activation (and, on budgeted keys, the worst-case tokens and spend the broker worked out);
   * free requests pass `undefined`. `flight` is what revocation will cut. `smallest` is what the
   * smallest request to the same model would hold: once the key cannot cover it, its 100 % alert
   * fires at settlement. `batch` lets the hold's ledger write join the turn's others.
   */
  hold(
    key: KeyRecord,
    amounts: Amounts | undefined,
    flight: InFlight,
    options: { batch?: boolean; smallest?: Amounts } = {},
  ): Maybe<Hold | Denial> {
    const policy = key.policy;
    const now = this.now();
    // The key was authenticated before the body was read and the credential fetched: a
    // revocation (or expiry) acknowledged in between must still stop this request.
    const ended = endedDenial(key, now);
    if (ended) return ended;
    const flights = this.inFlight.get(key.id) ?? new InFlightList<InFlight>();
    if (policy.concurrency !== undefined && flights.size >= policy.concurrency) {
      return concurrencyDenial(key, policy.concurrency, `${flights.size} are in flight`);
    }
    if (policy.rpm !== undefined) {
      const times = this.recent.get(key.id) ?? [];
      while (times.length > 0 && times[0]! <= now - MINUTE) times.shift();
      if (times.length >= policy.rpm) {
        return rateDenial(key, policy.rpm, Math.max(1, Math.ceil((times[0]! + MINUTE - now) / 1000)));
      }
      times.push(now);
      this.recent.set(key.id, times);
    }
    // The request's concurrency slot is taken now, before a team ledger's round trip, so that
    // requests arriving meanwhile count it.
    this.inFlight.set(key.id, flights);
    const entry = flights.add(flight);
    if (!amounts) {
      if (!this.shared || (policy.concurrency === undefined && policy.rpm === undefined))
        return new KeyHold(this, this.ledger, key, undefined, flights, entry, options.smallest);
      // On a team ledger a free request still takes a slot there (a hold of nothing): the key's
      // concurrency and rate count every broker's requests.
      amounts = {};
    }
    const result = this.ledger.hold(key.id, amounts, options.batch === true);
    // No closure on the local ledger's path: this runs for every billable request.
    if (!(result instanceof Promise)) return this.admitted(key, amounts, result, flights, entry, options.smallest);
    return result.then(
      (answer) => this.admitted(key, amounts, answer, flights, entry, options.smallest),
      (err: unknown) => {
        flights.delete(entry);
        return ledgerDenial(err);
      },
    );
  }

  /** The ledger answered for a request's hold: the request's {@link Hold}, or the refusal (its slot freed). */
  private admitted(
    key: KeyRecord,
    amounts: Amounts,
    result: HoldAnswer,
    flights: InFlightList<InFlight>,
    entry: InFlightEntry<InFlight>,
    smallest: Amounts | undefined,
  ): Hold | Denial {
    if ('concurrency' in result) {
      flights.delete(entry);
      return concurrencyDenial(key, result.concurrency, `${result.concurrency} are in flight across its brokers`);
    }
    if ('rpm' in result) {
      flights.delete(entry);
      return rateDenial(key, result.rpm, result.retryAfter);
    }
    if (!isRefusal(result)) return new KeyHold(this, this.ledger, key, result, flights, entry, smallest);
    flights.delete(entry);
    return refusal(result, amounts[result.meter] ?? 0);
  }

  /** After a settlement: the alerts it may call for (see {@link afterSpend}). */
  settled(key: KeyRecord, smallest?: Amounts): void {
    this.afterSpend(key, smallest);
  }

  /**
   * Registers a long-lived connection of a key (a WebSocket) so that revocation cuts it. It
   * holds no concurrency slot or hold: each request made over it takes its own.
   * Returns the function that unregisters it.
   */
  track(key: KeyRecord, session: InFlight): () => void {
    const set = this.sessions.get(key.id) ?? new Set<InFlight>();
    this.sessions.set(key.id, set);
    set.add(session);
    return () => {
      set.delete(session);
      if (set.size === 0 && this.sessions.get(key.id) === set) this.sessions.delete(key.id);
    };
  }

  /** Runs `then` once every hold taken so far is written to the ledger. */
  whenDurable(then: () => void): void {
    this.ledger.whenDurable(then);
  }

  /** What requests in flight hold of a key's limits. */
  heldFor(key: KeyRecord): Amounts {
    return this.ledger.reserved(key.id);
  }

  /** What is left of each limited meter: limit − used − reserved. */
  remaining(key: KeyRecord): Amounts {
    if (!hasLimits(key.policy)) return {};
    const limits = limitsOf(key.policy);
    const reserved = this.ledger.reserved(key.id);
    const left: Amounts = {};
    for (const meter of Object.keys(limits) as Meter[]) {
      left[meter] = Math.max(0, limits[meter]! - (key.used[meter] ?? 0) - (reserved[meter] ?? 0));
    }
    return left;
  }

  /** Raises a live key's limits; announcements start over for the raised limits. */
  extend(id: string, by: Extension): Maybe<KeySummary> {
    const key = this.ledger.get(id);
    if (!key) throw new Error(`no till key with id ${id}`);
    if (key.revokedAt !== undefined) throw new Error(`till key "${key.label}" is revoked`);
    const p = key.policy;
    const next: Policy = { ...p };
    if (by.uses !== undefined) next.maxActivations = (p.maxActivations ?? 0) + by.uses;
    if (by.maxTokens !== undefined) next.maxTokens = (p.maxTokens ?? 0) + by.maxTokens;
    if (by.maxSpend !== undefined) next.maxSpendUsd = Math.round(((p.maxSpendUsd ?? 0) + by.maxSpend) * MICROS) / MICROS;
    // Validates the amounts the same way as at issue.
    buildPolicy({ uses: next.maxActivations, maxTokens: next.maxTokens, maxSpend: next.maxSpendUsd });
    return andThen(this.ledger.updatePolicy(id, next), () => {
      this.announced.delete(id);
      const summary = this.summary(key);
      this.events.emit({ type: 'key.extended', at: this.now(), key: summary });
      return summary;
    });
  }

  /**
   * Announces crossing 50 %, 80 % and 100 % of each limit, once each per key. 100 % is also a
   * limit whose rest cannot pay for the smallest request (`smallest`, in that meter): a key that
   * can serve nothing more is exhausted, whatever its figures say.
   */
  private afterSpend(key: KeyRecord, smallest?: Amounts): void {
    if (!hasLimits(key.policy)) return;
    const limits = limitsOf(key.policy);
    const reserved = this.ledger.reserved(key.id);
    for (const meter of Object.keys(limits) as Meter[]) {
      const used = key.used[meter] ?? 0;
      const limit = limits[meter]!;
      const left = limit - used - (reserved[meter] ?? 0);
      if (used >= limit || (smallest?.[meter] !== undefined && left < smallest[meter] && (reserved[meter] ?? 0) === 0)) {
        if (this.once(key.id, `${meter}:100`)) this.events.emit({ type: 'key.exhausted', at: this.now(), key: this.summary(key), meter });
        continue;
      }
      const crossed = THRESHOLDS.filter((t) => used >= limit * t).at(-1);
      if (crossed !== undefined && this.once(key.id, `${meter}:${crossed}`)) {
        this.events.emit({
          type: 'limit.near',
          at: this.now(),
          key: this.summary(key),
          meter,
          used,
          limit,
          percent: Math.round(crossed * 100),
        });
      }
    }
  }

  private once(keyId: string, mark: string): boolean {
    let marks = this.announced.get(keyId);
    if (!marks) this.announced.set(keyId, (marks = new Set()));
    if (marks.has(mark)) return false;
    marks.add(mark);
    return true;
  }

  /**
   * One timer for the next expiry, so that `key.expired` arrives when it happens, not at the next
   * request, and the key's requests and streams in flight end then (an expired key serves nothing).
   */
  private scheduleExpiry(): void {
    clearTimeout(this.expiryTimer);
    const now = this.now();
    let next = Infinity;
    for (const key of this.ledger.keys()) {
      const at = key.policy.expiresAt;
      if (at === undefined || key.revokedAt !== undefined) continue;
      if (at <= now) {
        if (this.once(key.id, 'expired')) {
          this.cutAll(key);
          this.events.emit({ type: 'key.expired', at: now, key: this.summary(key) });
        }
      } else {
        next = Math.min(next, at);
      }
    }
    if (next !== Infinity) {
      // setTimeout overflows above 2^31-1 ms; re-check at least daily.
      this.expiryTimer = setTimeout(() => this.scheduleExpiry(), Math.min(next - now + 5, 86_400_000));
      this.expiryTimer.unref();
    }
  }

  close(): void {
    clearTimeout(this.expiryTimer);
    this.unsubscribe?.();
  }
}

/**
 * The denial when a team ledger's database could not answer: for a request (refused before
 * anything was held or sent), or for a stream whose hold could not change (`streamEnded`).
 */
export function ledgerDenial(err: unknown, streamEnded = false): Denial {
  const why = err instanceof Error ? err.message : String(err);
  if (streamEnded) {
    return { status: 503, code: 'ledger_unavailable', message: `the stream was ended: Till could not check this key's limits (${why})` };
  }
  return {
    status: 503,
    code: 'ledger_unavailable',
    message: `Till could not check this key's limits: ${why}; nothing was sent or counted, retry shortly`,
    retryAfter: 1,
  };
}

/**
 * The {@link Hold} of one admitted request (a class, not closures: one object per request on
 * the hot path).
 */
class KeyHold implements Hold {
  private reached = false;
  private finished = false;

  constructor(
    private readonly keys: TillKeys,
    private readonly ledger: KeyLedger,
    private readonly key: KeyRecord,
    /** Its hold in the ledger (none: the request is free). */
    private readonly ledgerHold: LedgerHold | undefined,
    private readonly flights: InFlightList<InFlight>,
    private readonly entry: InFlightEntry<InFlight>,
    private readonly smallest: Amounts | undefined,
  ) {}

  reachedUpstream(): void {
    this.reached = true;
  }

  held(): Amounts {
    return { ...(this.ledgerHold?.amounts ?? {}) };
  }

  resize(amounts: Amounts): Maybe<HoldRefusal | undefined> {
    // An ended hold holds nothing more (the ledger says the same of a hold no longer open).
    if (this.finished || !this.ledgerHold) return undefined;
    return this.ledger.resize(this.ledgerHold, amounts);
  }

  settle(actual?: Amounts, details?: SettleDetails): void {
    if (this.finished) return;
    this.finished = true;
    this.flights.delete(this.entry);
    if (!this.ledgerHold) return;
    if (this.reached) {
      // A team ledger's settlement never fails (it waits for the database, see postgres.ts).
      const settled = this.ledger.settle(this.ledgerHold, actual ?? this.ledgerHold.amounts, details);
      if (settled instanceof Promise) void settled.then(() => this.keys.settled(this.key, this.smallest));
      else this.keys.settled(this.key, this.smallest);
    } else {
      void this.ledger.release(this.ledgerHold);
    }
  }
}

/** A presented key, authenticated for a provider, or why not (naming the key once it was found). */
export type Authentication = { key: KeyRecord } | { denial: Denial; key?: KeyRecord };

/** A request over its key's concurrency limit; `inFlight` says how many are, and where. */
function concurrencyDenial(key: KeyRecord, limit: number, inFlight: string): Denial {
  return {
    status: 429,
    code: 'concurrency',
    message: `till key "${key.label}" allows ${limit} requests at once and ${inFlight}`,
    retryAfter: 1,
  };
}

/** A request over its key's rate limit, which frees a place in `retryAfter` seconds. */
function rateDenial(key: KeyRecord, rpm: number, retryAfter: number): Denial {
  return {
    status: 429,
    code: 'rate_limited',
    message: `till key "${key.label}" is limited to ${rpm} requests per minute; retry in ${retryAfter} s`,
    retryAfter,
  };
}
