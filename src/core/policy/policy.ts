/**
 * A till key's policy: its limits and its scope. Limits that are spent (activations now,
 * tokens and spend later) are "meters" so that one mechanism of holds covers them all.
 */
import { matchPattern } from '../providers/providers';

/**
 * Something a limit is counted in: billable requests, tokens (input + output), and spend in
 * micro-dollars (whole numbers, so sums and comparisons are exact).
 */
export type Meter = 'activations' | 'tokens' | 'spend';
export type Amounts = Partial<Record<Meter, number>>;

/** All meters, in display order. */
export const METERS: readonly Meter[] = ['activations', 'tokens', 'spend'];

/** Micro-dollars per US dollar: spend is counted in whole micro-dollars. */
export const MICROS = 1_000_000;

export interface Policy {
  /** Billable requests allowed. Default: unlimited. */
  maxActivations?: number;
  /** Tokens (input + output) allowed. Default: unlimited. */
  maxTokens?: number;
  /** US dollars allowed, at the price table's rates. Default: unlimited. */
  maxSpendUsd?: number;
  /** Epoch ms after which the key stops working. Default: never. */
  expiresAt?: number;
  /** Requests per minute (all requests, billable or not). Default: unlimited. */
  rpm?: number;
  /** Requests in flight at once. Default: unlimited. */
  concurrency?: number;
  /** Allowed HTTP methods, upper case. Default: all. */
  methods?: string[];
  /** Allowed path patterns in the provider's namespace, e.g. `/v1/chat/*`. Default: all. */
  paths?: string[];
  /** Allowed models (patterns), from the JSON body's `model` or the path. Default: all. */
  models?: string[];
}

/** What a user asks for at issue: durations as text (`30m`) or ms. */
export interface PolicyInput {
  uses?: number;
  maxTokens?: number;
  /** US dollars, e.g. 1.5. */
  maxSpend?: number;
  ttl?: string | number;
  rpm?: number;
  concurrency?: number;
  methods?: string[];
  paths?: string[];
  models?: string[];
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/** Parses `90s`, `30m`, `1h30m`, `7d`; a bare number is seconds. */
export function parseDuration(text: string): number {
  const trimmed = text.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const parts = [...trimmed.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d|w)/g)];
  if (parts.length === 0 || parts.map((p) => p[0]).join('') !== trimmed) {
    throw new Error(`"${text}" is not a duration: use e.g. 90s, 30m, 2h, 7d`);
  }
  return parts.reduce((sum, p) => sum + Number(p[1]) * UNITS[p[2]!]!, 0);
}

function positiveInt(value: number | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isSafeInteger(value) || value < 1) throw new Error(`${name} must be a whole number of at least 1 (got ${value})`);
  return value;
}

function list(values: string[] | undefined, name: string, check?: (v: string) => boolean): string[] | undefined {
  if (values === undefined) return undefined;
  const cleaned = values.map((v) => v.trim()).filter(Boolean);
  if (cleaned.length === 0) throw new Error(`${name} needs at least one value`);
  for (const v of cleaned) if (check && !check(v)) throw new Error(`${name}: "${v}" is not valid`);
  return cleaned;
}

/** Validates what a user asked for and turns it into a policy. Throws with a readable message. */
export function buildPolicy(input: PolicyInput, now = Date.now()): Policy {
  const policy: Policy = {};
  const uses = positiveInt(input.uses, 'uses');
  if (uses !== undefined) policy.maxActivations = uses;
  const tokens = positiveInt(input.maxTokens, 'max tokens');
  if (tokens !== undefined) policy.maxTokens = tokens;
  if (input.maxSpend !== undefined) {
    if (!Number.isFinite(input.maxSpend) || input.maxSpend <= 0)
      throw new Error(`max spend must be a positive number of US dollars (got ${input.maxSpend})`);
    if (input.maxSpend > 1_000_000) throw new Error('max spend is over $1,000,000: is that a typo?');
    policy.maxSpendUsd = input.maxSpend;
  }
  if (input.ttl !== undefined) {
    const ms = typeof input.ttl === 'number' ? input.ttl : parseDuration(input.ttl);
    if (!(ms > 0)) throw new Error('ttl must be longer than zero');
    policy.expiresAt = now + ms;
  }
  const rpm = positiveInt(input.rpm, 'rpm');
  if (rpm !== undefined) policy.rpm = rpm;
  const concurrency = positiveInt(input.concurrency, 'concurrency');
  if (concurrency !== undefined) policy.concurrency = concurrency;
  const methods = list(input.methods, 'methods', (m) => /^[A-Za-z]+$/.test(m));
  if (methods) policy.methods = methods.map((m) => m.toUpperCase());
  const paths = list(input.paths, 'paths', (p) => p.startsWith('/') || p === '*');
  if (paths) policy.paths = paths;
  const models = list(input.models, 'models');
  if (models) policy.models = models;
  return policy;
}

/** True when the policy limits any meter (activations, tokens or spend). Cheaper than {@link limitsOf}: no object. */
export function hasLimits(policy: Policy): boolean {
  return policy.maxActivations !== undefined || policy.maxTokens !== undefined || policy.maxSpendUsd !== undefined;
}

/** The limit of each meter under a policy; a missing meter is unlimited. */
export function limitsOf(policy: Policy): Amounts {
  const limits: Amounts = {};
  if (policy.maxActivations !== undefined) limits.activations = policy.maxActivations;
  if (policy.maxTokens !== undefined) limits.tokens = policy.maxTokens;
  if (policy.maxSpendUsd !== undefined) limits.spend = Math.round(policy.maxSpendUsd * MICROS);
  return limits;
}

/** Why a method is outside the policy's scope, or undefined. */
export function methodViolation(policy: Policy, method: string): string | undefined {
  if (policy.methods && !policy.methods.includes(method)) {
    return `method ${method} is not allowed for this till key (allowed: ${policy.methods.join(', ')})`;
  }
  return undefined;
}

/** Why a path (in the provider's API) is outside the policy's scope, or undefined. */
export function pathViolation(policy: Policy, path: string): string | undefined {
  if (policy.paths && !policy.paths.some((p) => matchPattern(p, path))) {
    return `path ${path} is not allowed for this till key (allowed: ${policy.paths.join(', ')})`;
  }
  return undefined;
}

/**
 * Why a model is outside a models scope, or undefined. `model` is undefined when the request
 * names none; the scope then refuses it only for billable requests (listing models names none
 * and is fine).
 */
export function modelViolation(models: string[] | undefined, model: string | undefined, billable: boolean): string | undefined {
  if (!models) return undefined;
  if (model === undefined)
    return billable ? `this till key is limited to models ${models.join(', ')} and the request names no model` : undefined;
  if (!models.some((p) => matchPattern(p, model))) return `model ${model} is not allowed for this till key (allowed: ${models.join(', ')})`;
  return undefined;
}

/** Checks a request against the policy's whole scope: method, path, then model. Returns why it is out of scope, or undefined. */
export function scopeViolation(
  policy: Policy,
  method: string,
  path: string,
  model: string | undefined,
  billable: boolean,
): string | undefined {
  return methodViolation(policy, method) ?? pathViolation(policy, path) ?? modelViolation(policy.models, model, billable);
}
