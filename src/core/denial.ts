/**
 * Errors an agent gets from the broker, in the provider's own error shape so its SDK raises
 * the usual error type, with a message a person understands. A message never holds a key.
 */
import type { DenialCode } from './events';
import { builtInProvider } from './providers/providers';
import type { ErrorShape } from './providers/wire';

/** A refusal with its HTTP status, reason code and message. */
export interface Denial {
  status: number;
  code: DenialCode;
  message: string;
  /** Seconds after which a retry may succeed (429). */
  retryAfter?: number;
}

/**
 * Tells a refusal from what a check returns when it passes (a plan, a hold, a key): every check
 * returns `T | Denial`, and this is the one way to tell them apart.
 */
export function isDenial<T extends object>(value: T | Denial): value is Denial {
  return 'status' in value && 'code' in value && 'message' in value;
}

/** The refusal of a request outside its key's scope (policy/policy.ts says why), or undefined when it is within. */
export function outOfScope(why: string | undefined): Denial | undefined {
  return why === undefined ? undefined : { status: 403, code: 'out_of_scope', message: why };
}

const ANTHROPIC_TYPES: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  403: 'permission_error',
  404: 'not_found_error',
  413: 'request_too_large',
  429: 'rate_limit_error',
};
const GOOGLE_STATUS: Record<number, string> = {
  400: 'INVALID_ARGUMENT',
  401: 'UNAUTHENTICATED',
  403: 'PERMISSION_DENIED',
  404: 'NOT_FOUND',
  413: 'INVALID_ARGUMENT',
  429: 'RESOURCE_EXHAUSTED',
};
const OPENAI_TYPES: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'invalid_request_error',
  403: 'permission_error',
  404: 'invalid_request_error',
  413: 'invalid_request_error',
  429: 'rate_limit_error',
};

/** The error shape of a provider's API (providers/wire.ts); custom providers and unknown ids get OpenAI's. */
function shapeOf(providerId: string | undefined): ErrorShape {
  return (providerId && builtInProvider(providerId)?.wire.errorShape) || 'openai';
}

/** The JSON body of a denial for a provider. */
export function denialBody(providerId: string | undefined, denial: Denial): object {
  const message = `till: ${denial.message}`;
  switch (shapeOf(providerId)) {
    case 'anthropic':
      return { type: 'error', error: { type: ANTHROPIC_TYPES[denial.status] ?? 'api_error', message } };
    case 'google':
      return { error: { code: denial.status, message, status: GOOGLE_STATUS[denial.status] ?? 'UNAVAILABLE' } };
    case 'github':
      return { message, documentation_url: 'https://github.com/till', status: String(denial.status) };
    case 'cohere':
      return { message };
    case 'openai':
      return { error: { message, type: OPENAI_TYPES[denial.status] ?? 'api_error', param: null, code: `till_${denial.code}` } };
  }
}

/**
 * The same denial as one SSE event, to end a stream that is already under way, in the shape of
 * the endpoint's own stream errors: Anthropic's `error` event; the Responses API's `error`
 * event (`{type, code, message, param, sequence_number}`, numbered after the last event sent,
 * `sequence`); elsewhere the provider's error body as a data line.
 */
export function denialEvent(
  providerId: string | undefined,
  denial: Denial,
  endpoint: { responses: boolean; sequence: number } = { responses: false, sequence: 0 },
): string {
  if (endpoint.responses && shapeOf(providerId) === 'openai') {
    const data = JSON.stringify({
      type: 'error',
      code: `till_${denial.code}`,
      message: `till: ${denial.message}`,
      param: null,
      sequence_number: endpoint.sequence,
    });
    return `event: error\ndata: ${data}\n\n`;
  }
  const data = JSON.stringify(denialBody(providerId, denial));
  return shapeOf(providerId) === 'anthropic' ? `event: error\ndata: ${data}\n\n` : `data: ${data}\n\n`;
}

/**
 * A denial as an HTTP answer: the JSON body and its headers. `retry-after` where waiting helps;
 * else, below 500, `x-should-retry: false`: SDKs (openai, anthropic) retry 429 and 5xx unless
 * told not to, and retrying an exhausted, revoked or out-of-scope key only delays the error the
 * agent needs to see.
 */
export function denialResponse(providerId: string | undefined, denial: Denial): { body: string; headers: Record<string, string | number> } {
  const body = JSON.stringify(denialBody(providerId, denial));
  const headers: Record<string, string | number> = {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    'x-till-denial': denial.code,
  };
  if (denial.retryAfter !== undefined) headers['retry-after'] = String(denial.retryAfter);
  else if (denial.status < 500) headers['x-should-retry'] = 'false';
  return { body, headers };
}
