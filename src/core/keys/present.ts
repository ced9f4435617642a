/**
 * How Till writes amounts, durations, policies and key summaries for people: one set of words in
 * the `till` command, the Keys tree, the Usage view, alerts and refusals.
 */
import type { Denial } from '../denial';
import type { KeySummary } from '../events';
import { MICROS, type Meter, type Policy } from '../policy/policy';

/** `$1.50`, `$0.0042`: enough digits to see small spends. */
export function formatUsd(micros: number): string {
  const usd = micros / MICROS;
  return `$${usd >= 1 || usd === 0 ? usd.toFixed(2) : usd.toPrecision(2)}`;
}

/**
 * Money spent, as people read it everywhere: `~` when part of it was estimated, `<$0.0001` for
 * less than shows, and "unknown" for requests to a model without a price (`unpriced` of them):
 * their dollars are not zero, they are not known.
 */
export function formatSpent(micros: number, how: { estimated?: boolean; unpriced?: number } = {}): string {
  const known = `${how.estimated ? '~' : ''}${micros > 0 && micros < 100 ? '<$0.0001' : formatUsd(micros)}`;
  if (!how.unpriced) return known;
  return micros > 0 ? `${known} + unknown` : 'unknown';
}

/** How a person reads an amount of a meter. */
export function formatAmount(meter: Meter, amount: number): string {
  if (meter === 'spend') return formatUsd(amount);
  const n = Math.round(amount);
  return `${formatCount(n)}${meter === 'tokens' ? (n === 1 ? ' token' : ' tokens') : ''}`;
}

/** `1,234`: a count of calls or tokens, whole, without its unit. */
export function formatCount(n: number): string {
  return Math.round(n).toLocaleString('en-US');
}

/** A one-line description of a policy, for `till ls`, tooltips and logs. */
export function describePolicy(policy: Policy, now = Date.now()): string {
  const parts: string[] = [];
  parts.push(policy.maxActivations === undefined ? 'unlimited calls' : `${policy.maxActivations} calls`);
  if (policy.maxTokens !== undefined) parts.push(`${policy.maxTokens.toLocaleString('en-US')} tokens`);
  if (policy.maxSpendUsd !== undefined) parts.push(`$${policy.maxSpendUsd.toFixed(2)}`);
  if (policy.expiresAt !== undefined)
    parts.push(policy.expiresAt > now ? `expires in ${formatDuration(policy.expiresAt - now)}` : 'expired');
  if (policy.rpm !== undefined) parts.push(`${policy.rpm}/min`);
  if (policy.concurrency !== undefined) parts.push(`${policy.concurrency} at once`);
  if (policy.methods) parts.push(policy.methods.join(','));
  if (policy.paths) parts.push(policy.paths.join(','));
  if (policy.models) parts.push(`models ${policy.models.join(',')}`);
  return parts.join(', ');
}

/** `1h 5m`, `42s`: the largest two units. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const units: [string, number][] = [
    ['d', 86400],
    ['h', 3600],
    ['m', 60],
    ['s', 1],
  ];
  const parts: string[] = [];
  let rest = s;
  for (const [name, size] of units) {
    if (rest >= size || (parts.length === 0 && size === 1)) {
      parts.push(`${Math.floor(rest / size)}${name}`);
      rest %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(' ');
}

/** Calls used, and the limit when there is one: `3/50`, `3`. */
export function callsUsed(key: KeySummary): string {
  const used = key.used.activations ?? 0;
  return key.policy.maxActivations === undefined ? `${used}` : `${used}/${key.policy.maxActivations}`;
}

/** Dollars spent (see {@link formatSpent}), and the limit when there is one: `~$0.42/$5.00`. */
export function spendUsed(key: KeySummary): string {
  const spent = formatSpent(key.used.spend ?? 0, { estimated: key.estimatedSpend > 0, unpriced: key.spend.unpricedRequests });
  return key.policy.maxSpendUsd === undefined ? spent : `${spent}/$${key.policy.maxSpendUsd.toFixed(2)}`;
}

/** How long a key has left (`1h 5m`, rounded up to the minute when `minutes`), `expired`, or undefined: it never expires. */
export function timeLeft(key: KeySummary, now: number, minutes = false): string | undefined {
  if (key.policy.expiresAt === undefined) return undefined;
  const left = key.policy.expiresAt - now;
  if (left <= 0) return 'expired';
  return formatDuration(minutes ? Math.ceil(left / 60_000) * 60_000 : left);
}

/** Seconds a client is asked to wait when requests in flight hold what a refused request needs. */
export const RETRY_WHEN_HELD_S = 1;

/**
 * The refusal of a request a limit cannot cover, in one set of words everywhere: which limit,
 * what is used, held by requests in flight and left ("0 held" included), then `asked` (what the
 * request needed, and why). With `needs` (a request being admitted): when it would fit in what the
 * requests in flight hold, it may fit once they end (they are held at their most and settle at
 * what they used), so the client is asked to retry (`Retry-After`) rather than told the key is
 * spent. An activation in flight is used once it reaches the upstream: that refusal stands.
 */
export function limitRefusal(meter: Meter, state: { limit: number; used: number; held: number }, asked: string, needs?: number): Denial {
  const { limit, used, held } = state;
  const left = Math.max(0, limit - used - held);
  const n = (amount: number) => (meter === 'spend' ? formatUsd(amount) : formatCount(amount));
  if (meter === 'activations')
    return {
      status: 429,
      code: 'exhausted',
      message: `till key exhausted: ${n(used)} of ${n(limit)} activations used${held > 0 ? ` (${n(held)} more in flight)` : ''}`,
    };
  const message = `${meter === 'tokens' ? 'till key out of tokens' : 'till key over budget'}: ${n(used)} of ${meter === 'tokens' ? `${n(limit)} tokens used` : `${n(limit)} spent`}, ${n(held)} held by requests in flight, ${n(left)} left; ${asked}`;
  if (needs === undefined || held === 0 || needs > limit - used) return { status: 429, code: 'exhausted', message };
  return {
    status: 429,
    code: 'exhausted',
    message: `${message}; it may fit once the requests in flight end: retry`,
    retryAfter: RETRY_WHEN_HELD_S,
  };
}
