/**
 * The Usage view's state and how host messages change it, apart from the DOM (main.ts draws it):
 * the keys, the ended requests, the open streams' running usage, and the figures the page shows
 * (today's totals, the last half hour by minute). Pure: no DOM, no clock of its own (`now` is
 * given), so test/webviewState.test.ts drives it as the host would.
 */
import type { TillRole } from '../core/runtime/connection';
import type { KeySummary, RequestRecord, RequestUsage } from '../core/events';
import type { TokenCounts } from '../core/ledger/ledger';
import type { Amounts, Meter } from '../core/policy/policy';
import { mergeRecords, type HostMessage, type LiveEvent } from './messages';

export const MINUTE = 60_000;
/** Minutes the charts cover. */
export const SPAN = 30;

export type State = KeySummary['state'];

/** An open stream's latest running usage, from `request.progress`. */
export interface Stream {
  keyId: string;
  usage: RequestUsage;
  /** What it holds of its key's limits now (a budgeted key's hold follows the stream). */
  held: Amounts | undefined;
  /** When its last progress came (page clock). */
  seen: number;
}
export const STATE_ORDER: Record<State, number> = { active: 0, exhausted: 1, expired: 2, revoked: 3 };

/** What the page knows. */
export interface PageModel {
  /** A `state` message has arrived: there is something to draw. */
  loaded: boolean;
  keys: Map<string, KeySummary>;
  /** Ended requests, oldest first. */
  records: RequestRecord[];
  seen: Set<string>;
  /** Older requests were dropped: today's counts are lower bounds. */
  truncated: boolean;
  role: TillRole;
  brokerUrl: string | undefined;
  /** Where the broker runs and where the real keys are (the host's words). */
  placement: string;
  hasCredential: boolean;
  error: string | undefined;
  /** Keys whose revoke was asked for and not yet seen through. */
  revoking: Set<string>;
  /** Open streams by request id, until their `request.finished`. */
  streams: Map<string, Stream>;
  /** The revoked keys' list is open (kept across reloads). */
  showRevoked: boolean;
}

export function newModel(showRevoked = false): PageModel {
  return {
    loaded: false,
    keys: new Map(),
    records: [],
    seen: new Set(),
    truncated: false,
    role: 'down',
    brokerUrl: undefined,
    placement: '',
    hasCredential: true,
    error: undefined,
    revoking: new Set(),
    streams: new Map(),
    showRevoked,
  };
}

/** What a message changed: nothing to draw, only the open streams' running usage, or anything; and what to announce to a screen reader. */
export interface Change {
  repaint: 'none' | 'live' | 'all';
  announce?: string;
}

/** Applies one host message to the model, at page time `now`. */
export function receive(model: PageModel, msg: HostMessage, now: number): Change {
  switch (msg.type) {
    case 'state':
      model.loaded = true;
      // A fresh start (after a revoke, a broker change, or the view hidden while events were not
      // sent): keep only streams heard from just now; others still open report again within half a second.
      forgetStreams(model, undefined, now - 2000);
      setKeys(model, msg.keys, now);
      model.records = [];
      model.seen.clear();
      model.truncated = msg.truncated;
      addRecords(model, msg.recent);
      model.role = msg.role;
      model.brokerUrl = msg.brokerUrl;
      model.placement = msg.placement;
      model.hasCredential = msg.hasCredential;
      model.error = msg.error;
      model.revoking.clear();
      return { repaint: 'all' };
    case 'keys':
      setKeys(model, msg.keys, now);
      return { repaint: 'all' };
    case 'event': {
      if (msg.event.type === 'request.progress') {
        const { request, usage, held } = msg.event;
        model.streams.set(request.requestId, { keyId: request.keyId, usage, held, seen: now });
        return { repaint: 'live' };
      }
      const announce = applyEvent(model, msg.event);
      return announce === undefined ? { repaint: 'all' } : { repaint: 'all', announce };
    }
    case 'role':
      model.role = msg.role;
      model.brokerUrl = msg.brokerUrl;
      if (msg.role === 'down') model.streams.clear();
      return { repaint: 'all' };
    default:
      return { repaint: 'none' };
  }
}

/** The keys as drawn: live ones first, newest first within a state. */
export function sortedKeys(model: PageModel, now: number): { key: KeySummary; state: State }[] {
  const keys = [...model.keys.values()].map((k) => ({ key: k, state: stateOf(k, now) }));
  keys.sort((a, b) => STATE_ORDER[a.state] - STATE_ORDER[b.state] || b.key.createdAt - a.key.createdAt);
  return keys;
}

const METER_NAME: Record<Meter, string> = { activations: 'call', tokens: 'token', spend: 'spend' };

/**
 * Fills what a broker from an older Till (running in another window) does not send, so the page
 * draws its keys without tokens or dollars rather than failing.
 */
function normal(k: KeySummary): KeySummary {
  const old = k as Partial<KeySummary>;
  return {
    ...k,
    used: old.used ?? {},
    reserved: old.reserved ?? {},
    remaining: old.remaining ?? {},
    tokens: { ...noTokens(), ...old.tokens },
    estimatedSpend: old.estimatedSpend ?? 0,
    spend: { usd: 0, pricedUsd: 0, estimatedUsd: 0, reservedUsd: 0, unpricedRequests: 0, ...old.spend },
  };
}

function setKeys(model: PageModel, keys: KeySummary[], now: number): void {
  model.keys = new Map(keys.map((k) => [k.id, normal(k)]));
  for (const id of model.revoking) if ((model.keys.get(id)?.state ?? 'revoked') === 'revoked') model.revoking.delete(id);
  // A key with nothing in flight has no open stream: drop any whose `request.finished` was missed.
  // Not the freshest ones: this list may have been read before their stream started.
  forgetStreams(model, (st) => (model.keys.get(st.keyId)?.inFlight ?? 0) === 0, now - 2000);
}

/** Drops the streams last heard from before `before` (and matching `which`, if given). */
function forgetStreams(model: PageModel, which: ((st: Stream) => boolean) | undefined, before: number): void {
  for (const [id, st] of model.streams) if (st.seen < before && (!which || which(st))) model.streams.delete(id);
}

function applyEvent(model: PageModel, e: LiveEvent): string | undefined {
  switch (e.type) {
    case 'request.finished':
      model.streams.delete(e.request.requestId);
      addRecords(model, [e]);
      return undefined;
    case 'request.denied':
      addRecords(model, [e]);
      return undefined;
    case 'key.issued':
    case 'key.revoked':
    case 'key.exhausted':
    case 'key.expired':
    case 'key.extended':
    case 'limit.near': {
      model.keys.set(e.key.id, normal(e.key));
      if (e.type === 'key.revoked') model.revoking.delete(e.key.id);
      const label = e.key.label;
      return e.type === 'key.exhausted'
        ? `Till key ${label} used up its ${METER_NAME[e.meter]} limit.`
        : e.type === 'limit.near'
          ? `Till key ${label} has used ${e.percent}% of its ${METER_NAME[e.meter]} limit.`
          : `Till key ${label} ${{ 'key.issued': 'issued', 'key.revoked': 'revoked', 'key.expired': 'expired', 'key.extended': 'extended' }[e.type]}.`;
    }
    case 'request.progress':
      return undefined;
  }
}

/** Adds requests once each, keeping them oldest first and at most HISTORY. */
function addRecords(model: PageModel, records: RequestRecord[]): void {
  if (mergeRecords(model.records, model.seen, records)) model.truncated = true;
}

export function noTokens(): TokenCounts {
  return { input: 0, output: 0, cached: 0, reasoning: 0 };
}
export function addTokens(into: TokenCounts, t: TokenCounts): void {
  into.input += t.input;
  into.output += t.output;
  into.cached += t.cached;
  into.reasoning += t.reasoning;
}

/** The state to show: an active key past its expiry is expired even before the broker says so. */
export function stateOf(k: KeySummary, now: number): State {
  return k.state === 'active' && k.policy.expiresAt !== undefined && k.policy.expiresAt <= now ? 'expired' : k.state;
}

// ---- figures ------------------------------------------------------------------------------

export interface Series {
  served: number[];
  denied: number[];
}
export const series = (): Series => ({ served: new Array<number>(SPAN).fill(0), denied: new Array<number>(SPAN).fill(0) });

export interface Stats {
  total: Series;
  byKey: Map<string, Series>;
  servedToday: number;
  deniedToday: number;
  /** Micro-dollars settled today, from the requests seen. */
  spendToday: number;
  /** Some of today's spend was estimated. */
  spendTodayEstimated: boolean;
  /** Requests today to a model without a price (their dollars are unknown). */
  unpricedToday: number;
  tokensToday: TokenCounts;
  /** Today's counts may miss requests older than what is kept. */
  todayPartial: boolean;
  firstMinute: number;
}

export function stats(model: PageModel, now: number): Stats {
  const firstMinute = Math.floor(now / MINUTE) - SPAN + 1;
  const midnight = new Date(now).setHours(0, 0, 0, 0);
  const out: Stats = {
    total: series(),
    byKey: new Map(),
    servedToday: 0,
    deniedToday: 0,
    spendToday: 0,
    spendTodayEstimated: false,
    unpricedToday: 0,
    tokensToday: noTokens(),
    todayPartial: false,
    firstMinute,
  };
  const since = Math.min(midnight, firstMinute * MINUTE);
  const recs = model.records;
  for (let i = recs.length - 1; i >= 0; i--) {
    const r = recs[i]!;
    if (r.at < since) break;
    const denied = r.type === 'request.denied';
    // Never reached the upstream: not a call (the ledger counted nothing); its row still shows.
    if (!denied && r.uncounted) continue;
    if (r.at >= midnight) {
      if (r.type === 'request.denied') out.deniedToday++;
      else {
        out.servedToday++;
        if (r.usage) {
          addTokens(out.tokensToday, r.usage.tokens);
          out.spendToday += r.usage.spend ?? 0;
          if (r.usage.spend === undefined) out.unpricedToday++;
          if (r.usage.estimated && (r.usage.spend ?? 0) > 0) out.spendTodayEstimated = true;
        }
      }
    }
    const slot = Math.floor(r.at / MINUTE) - firstMinute;
    if (slot < 0 || slot >= SPAN) continue;
    const field = denied ? 'denied' : 'served';
    out.total[field][slot]!++;
    const keyId = r.request.keyId;
    if (keyId) {
      let ks = out.byKey.get(keyId);
      if (!ks) out.byKey.set(keyId, (ks = series()));
      ks[field][slot]!++;
    }
  }
  const oldest = recs[0];
  out.todayPartial = model.truncated && oldest !== undefined && oldest.at >= midnight;
  return out;
}

// ---- open streams ---------------------------------------------------------------------------

export interface Running {
  count: number;
  /** Micro-dollars so far, of the streams whose model has a price. */
  spend: number;
  priced: boolean;
  tokens: number;
  /** What the streams hold of their keys' limits, summed (budgeted keys only). */
  held: Amounts;
  /** The streams themselves. */
  each: Stream[];
}

/** The running usage of the open streams of one key, or of all keys. */
export function running(model: PageModel, keyId?: string): Running {
  const out: Running = { count: 0, spend: 0, priced: false, tokens: 0, held: {}, each: [] };
  for (const st of model.streams.values()) {
    if (keyId !== undefined && st.keyId !== keyId) continue;
    out.count++;
    out.tokens += st.usage.tokens.input + st.usage.tokens.output;
    if (st.usage.spend !== undefined) {
      out.spend += st.usage.spend;
      out.priced = true;
    }
    if (st.held?.spend !== undefined) out.held.spend = (out.held.spend ?? 0) + st.held.spend;
    if (st.held?.tokens !== undefined) out.held.tokens = (out.held.tokens ?? 0) + st.held.tokens;
    out.each.push(st);
  }
  return out;
}
