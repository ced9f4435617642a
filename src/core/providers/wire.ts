/**
 * How a provider's API behaves on the wire beyond where its key goes: which routes answer with
 * token usage and in which format, the shape of its errors, whether its streams must be asked for
 * their usage, and what its WebSockets speak. One record per API family, named by each catalogue
 * entry (providers.ts): a new provider that speaks a known family is one entry and its prices.
 * Facts: ../shared/PROVIDERS.md.
 */

/** The usage format of a response: which fields and events carry its token counts (metering/usage.ts reads them). */
export type UsageFormat =
  'openai-chat' | 'openai-responses' | 'openai-completions' | 'openai-embeddings' | 'anthropic-messages' | 'gemini' | 'cohere-chat';

/** The shape of an API's error bodies: refusals are sent in it, so the client's SDK raises its own error type (denial.ts). */
export type ErrorShape = 'openai' | 'anthropic' | 'google' | 'github' | 'cohere';

/** The dialect of a WebSocket route: how its requests and usage are found in its messages (broker/ws/). */
export type SocketDialect = 'responses' | 'realtime' | 'gemini' | 'generic';

/** A provider's wire behaviour. */
export interface Wire {
  /**
   * The usage format a POST to `path` answers in (the path in the provider's namespace, no query
   * or trailing slash), or undefined: not metered (token counting, batches, a route without usage).
   */
  usageFormat(path: string): UsageFormat | undefined;
  errorShape: ErrorShape;
  /**
   * Its Chat Completions streams carry usage only when asked (`stream_options.include_usage`), and
   * it accepts the option: Till asks, and hides the extra chunk from a client that did not.
   */
  asksStreamUsage: boolean;
  /** The dialect of a WebSocket opened on `path`. */
  socketDialect(path: string): SocketDialect;
}

/**
 * The format of an OpenAI-shaped endpoint, by the end of its path, so that every base path works:
 * `/v1/…`, Groq's `/openai/v1/…`, Perplexity's and DeepSeek's bare `/…`, Azure's
 * `/openai/deployments/{d}/…` and `/openai/v1/…`.
 */
function openAiShapedFormat(path: string): UsageFormat | undefined {
  // Mistral's FIM and agents endpoints answer in the chat shape.
  if (/\/(?:chat|fim|agents)\/completions$/.test(path)) return 'openai-chat';
  if (/\/completions$/.test(path)) return 'openai-completions';
  if (/\/responses$/.test(path)) return 'openai-responses';
  if (/\/embeddings$/.test(path)) return 'openai-embeddings';
  // Anthropic-compatible endpoints: OpenRouter for Anthropic-SDK clients, DeepSeek's /anthropic.
  if (/\/v1\/messages$/.test(path)) return 'anthropic-messages';
  return undefined;
}

const generic = (): SocketDialect => 'generic';

/** The OpenAI API and those that copy it; `asksStreamUsage` where the API accepts `stream_options`. */
export function openAiWire(asksStreamUsage: boolean): Wire {
  return {
    usageFormat: openAiShapedFormat,
    errorShape: 'openai',
    asksStreamUsage,
    socketDialect: (path) =>
      openAiShapedFormat(path) === 'openai-responses' ? 'responses' : /\/realtime$/.test(path) ? 'realtime' : 'generic',
  };
}

export const ANTHROPIC_WIRE: Wire = {
  // /v1/messages/count_tokens and /v1/messages/batches are not metered here.
  usageFormat: (path) => (path === '/v1/messages' ? 'anthropic-messages' : undefined),
  errorShape: 'anthropic',
  asksStreamUsage: false,
  socketDialect: generic,
};

const GEMINI_GENERATE = /^\/v1(?:alpha|beta)?\/(?:models|tunedModels)\/[^/:]+:(?:generateContent|streamGenerateContent)$/;
const GEMINI_OPENAI = /^\/v1(?:alpha|beta)?\/openai(\/.*)$/;

export const GEMINI_WIRE: Wire = {
  usageFormat(path) {
    if (GEMINI_GENERATE.test(path)) return 'gemini';
    const compat = GEMINI_OPENAI.exec(path);
    return compat ? openAiShapedFormat(compat[1]!) : undefined;
  },
  errorShape: 'google',
  asksStreamUsage: false,
  // The Live API.
  socketDialect: (path) => (/\.BidiGenerateContent(?:Constrained)?$/.test(path) ? 'gemini' : 'generic'),
};

export const COHERE_WIRE: Wire = {
  usageFormat(path) {
    if (path === '/v2/chat') return 'cohere-chat';
    const compat = /^\/compatibility\/v1(\/(?:chat\/completions|embeddings))$/.exec(path);
    return compat ? openAiShapedFormat(compat[1]!) : undefined;
  },
  errorShape: 'cohere',
  asksStreamUsage: false,
  socketDialect: generic,
};

/** An API whose answers carry no token usage (GitHub's REST API): counted in calls only. */
export function unmeteredWire(errorShape: ErrorShape): Wire {
  return { usageFormat: () => undefined, errorShape, asksStreamUsage: false, socketDialect: generic };
}
