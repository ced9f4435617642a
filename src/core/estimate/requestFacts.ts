/**
 * What a request's body says about what the upstream can bill for it, read once per billable
 * request by walking its structure (never its text): the parts whose bytes do not bound their
 * tokens (images), what the provider adds from its own state (a stored conversation, a file by
 * id, a cached prompt, server-side tool results), fees (server-side tools), premiums (cache
 * writes, the priority tier), and how much output it may produce (its cap, `n`, streaming,
 * hidden reasoning). Facts per provider: ../shared/PROVIDERS.md, "What providers bill beyond the
 * request body". holds/plan.ts turns these facts into a hold.
 */
import { asArray, asObj, asStr, type Json } from '../json';
import type { UsageFormat } from '../providers/wire';

/** An image in the request: its base64 data when inline (its size can be read), else none. */
export interface ImagePart {
  /** Base64 data of an inline image (a `data:` URL's payload, a base64 source). */
  base64?: string;
  /** OpenAI's `detail` (`low` costs a fixed amount). */
  detail?: string;
}

/**
 * A server-side tool the request offers the model: its calls bill a fee and their results are
 * billed as input (what one call may add: prices.json `toolResults`; holds/plan.ts holds them).
 */
export interface ServerTool {
  /** The tool's type as priced (`web_search`, `file_search`, `google_search`, …). */
  type: string;
  /** The most calls the request allows (Anthropic `max_uses`, OpenAI `max_tool_calls`), when it says. */
  maxCalls?: number;
}

/** What a body shows about a request's cost. */
export interface RequestFacts {
  /** Completions per request (`n`, Gemini `candidateCount`). */
  n: number;
  images: ImagePart[];
  /**
   * Input the provider adds that Till cannot see or bound from the body, in words (`a file by
   * id`, `cached content`, …): such a request is held for the model's whole context window.
   */
  unseen: string[];
  /** OpenAI Responses `previous_response_id`: the stored conversation it continues. */
  previousResponse?: string;
  /** OpenAI Responses `conversation`: a stored conversation the response reads and extends. */
  conversation?: string;
  serverTools: ServerTool[];
  /** The request marks content for caching: Anthropic `cache_control` (`1h` when a 1-hour TTL is asked). */
  cache: 'none' | '5m' | '1h';
  /** `service_tier` as asked. */
  serviceTier?: string;
  /** Whether the request turns hidden reasoning on or off; undefined: the model's default. */
  hiddenOutput?: boolean;
  /** A response the upstream finishes after the HTTP answer (Responses `background`): Till cannot meter it. */
  background: boolean;
}

function blank(): RequestFacts {
  return { n: 1, images: [], unseen: [], serverTools: [], cache: 'none', background: false };
}

/** A `data:` URL's base64 payload, or undefined for any other URL. */
function dataUrlBase64(url: string): string | undefined {
  if (!url.startsWith('data:')) return undefined;
  const comma = url.indexOf(',');
  return comma > 0 && url.slice(0, comma).endsWith(';base64') ? url.slice(comma + 1) : undefined;
}

function addImageUrl(facts: RequestFacts, url: string | undefined, detail: string | undefined): void {
  const base64 = url === undefined ? undefined : dataUrlBase64(url);
  facts.images.push(base64 === undefined ? { detail } : { base64, detail });
}

function note(facts: RequestFacts, what: string): void {
  if (!facts.unseen.includes(what)) facts.unseen.push(what);
}

function count(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : undefined;
}

// ---------------------------------------------------------------------------------------------
// OpenAI Chat Completions (and the compatible providers)

function chatPart(facts: RequestFacts, part: Json): void {
  switch (part.type) {
    case 'image_url': {
      const image = asObj(part.image_url);
      addImageUrl(facts, asStr(image?.url) ?? asStr(part.image_url), asStr(image?.detail));
      return;
    }
    case 'file': {
      const file = asObj(part.file);
      // A PDF is billed by its pages' text and images: its bytes do not bound that.
      note(facts, file?.file_id !== undefined ? 'a file by id' : 'a file (PDF)');
      return;
    }
  }
}

function readChat(facts: RequestFacts, body: Json): void {
  for (const m of asArray(body.messages)) {
    const content = asObj(m)?.content;
    for (const p of asArray(content)) {
      const part = asObj(p);
      if (part) chatPart(facts, part);
    }
  }
  const n = count(body.n);
  if (n !== undefined && n > 1) facts.n = n;
  // Search models run one search per request and bill it.
  if (body.web_search_options !== undefined) {
    facts.serverTools.push({ type: 'web_search', maxCalls: 1 });
  }
  const effort = asStr(body.reasoning_effort);
  if (effort === 'none') facts.hiddenOutput = false;
}

// ---------------------------------------------------------------------------------------------
// OpenAI Responses

/** Responses tools the upstream runs itself, by their type in `tools`: their results are input. */
const RESPONSES_SERVER_TOOLS = new Set([
  'web_search',
  'web_search_preview',
  'web_search_2025_08_26',
  'file_search',
  'code_interpreter',
  'image_generation',
  'mcp',
  'computer_use_preview',
]);

function responsesPart(facts: RequestFacts, part: Json): void {
  switch (part.type) {
    case 'input_image':
      if (part.file_id !== undefined) addImageUrl(facts, undefined, asStr(part.detail));
      else addImageUrl(facts, asStr(part.image_url), asStr(part.detail));
      return;
    case 'input_file':
      note(facts, part.file_id !== undefined ? 'a file by id' : part.file_url !== undefined ? 'a file by URL' : 'a file (PDF)');
      return;
  }
}

function readResponses(facts: RequestFacts, body: Json): void {
  for (const i of asArray(body.input)) {
    const item = asObj(i);
    if (!item) continue;
    if (item.type === 'item_reference') note(facts, 'a stored item (item_reference)');
    for (const p of asArray(item.content)) {
      const part = asObj(p);
      if (part) responsesPart(facts, part);
    }
    // A function call's output may carry images and files too.
    for (const p of asArray(item.output)) {
      const part = asObj(p);
      if (part) responsesPart(facts, part);
    }
  }
  const previous = asStr(body.previous_response_id);
  if (previous) facts.previousResponse = previous;
  const conversation = asStr(body.conversation) ?? asStr(asObj(body.conversation)?.id);
  if (conversation) facts.conversation = conversation;
  if (body.prompt !== undefined) note(facts, 'a stored prompt');
  const maxCalls = count(body.max_tool_calls);
  for (const t of asArray(body.tools)) {
    const type = asStr(asObj(t)?.type);
    if (type === undefined || !RESPONSES_SERVER_TOOLS.has(type)) continue;
    const priced = type.startsWith('web_search') && type !== 'web_search_preview' ? 'web_search' : type;
    facts.serverTools.push(maxCalls === undefined ? { type: priced } : { type: priced, maxCalls });
  }
  if (body.background === true) facts.background = true;
  const effort = asStr(asObj(body.reasoning)?.effort);
  if (effort === 'none') facts.hiddenOutput = false;
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages

/** Anthropic server tools by the prefix of their versioned type (`web_search_20250305`). */
const ANTHROPIC_SERVER_TOOLS = ['web_search', 'web_fetch', 'code_execution'];

function cacheMark(facts: RequestFacts, o: Json): void {
  const mark = asObj(o.cache_control);
  if (!mark) return;
  if (mark.ttl === '1h') facts.cache = '1h';
  else if (facts.cache === 'none') facts.cache = '5m';
}

function anthropicSource(facts: RequestFacts, block: Json): void {
  const source = asObj(block.source);
  const kind = source?.type;
  if (block.type === 'image') {
    if (kind === 'base64' && typeof source?.data === 'string') {
      facts.images.push({ base64: source.data });
    } else facts.images.push({});
    return;
  }
  // A document (PDF) is billed by its pages' text and images, whatever its source; plain text
  // sources are in the body like any text.
  if (kind !== 'text' && kind !== 'content')
    note(facts, kind === 'file' ? 'a file by id' : kind === 'url' ? 'a document by URL' : 'a document (PDF)');
}

function anthropicBlocks(facts: RequestFacts, blocks: unknown): void {
  for (const b of asArray(blocks)) {
    const block = asObj(b);
    if (!block) continue;
    cacheMark(facts, block);
    if (block.type === 'image' || block.type === 'document') anthropicSource(facts, block);
    else if (block.type === 'tool_result') anthropicBlocks(facts, block.content);
    else if (block.type === 'container_upload') note(facts, 'a file by id');
  }
}

function readAnthropic(facts: RequestFacts, body: Json): void {
  cacheMark(facts, body);
  anthropicBlocks(facts, body.system);
  for (const m of asArray(body.messages)) anthropicBlocks(facts, asObj(m)?.content);
  for (const t of asArray(body.tools)) {
    const tool = asObj(t);
    if (!tool) continue;
    cacheMark(facts, tool);
    const type = asStr(tool.type);
    const server = type && ANTHROPIC_SERVER_TOOLS.find((s) => type.startsWith(`${s}_`));
    if (!server) continue;
    const maxUses = count(tool.max_uses);
    facts.serverTools.push(maxUses === undefined ? { type: server } : { type: server, maxCalls: maxUses });
  }
  if (body.mcp_servers !== undefined) note(facts, 'MCP server results');
  if (body.container !== undefined) note(facts, 'a container');
  const thinking = asStr(asObj(body.thinking)?.type);
  // Claude's thinking is billed in full but streamed summarised: hidden output.
  if (thinking === 'enabled' || thinking === 'adaptive') facts.hiddenOutput = true;
  else if (thinking === 'disabled') facts.hiddenOutput = false;
}

// ---------------------------------------------------------------------------------------------
// Gemini

/** Gemini tools the upstream runs itself, by their key in a `tools` entry, as priced. */
const GEMINI_SERVER_TOOLS: Record<string, string> = {
  googleSearch: 'google_search',
  google_search: 'google_search',
  googleSearchRetrieval: 'google_search',
  urlContext: 'url_context',
  url_context: 'url_context',
  codeExecution: 'code_execution',
  fileSearch: 'file_search',
};

function geminiParts(facts: RequestFacts, parts: unknown): void {
  for (const p of asArray(parts)) {
    const part = asObj(p);
    if (!part) continue;
    const inline = asObj(part.inlineData) ?? asObj(part.inline_data);
    const mime = asStr(inline?.mimeType) ?? asStr(inline?.mime_type);
    if (inline && mime?.startsWith('image/') && typeof inline.data === 'string') {
      facts.images.push({ base64: inline.data });
    } else if (inline && mime === 'application/pdf') note(facts, 'a document (PDF)');
    if (part.fileData !== undefined || part.file_data !== undefined) note(facts, 'a file by URI');
  }
}

function readGemini(facts: RequestFacts, body: Json): void {
  for (const c of asArray(body.contents)) geminiParts(facts, asObj(c)?.parts);
  geminiParts(facts, asObj(body.systemInstruction ?? body.system_instruction)?.parts);
  if (body.cachedContent !== undefined || body.cached_content !== undefined) note(facts, 'cached content');
  for (const t of asArray(body.tools)) {
    const tool = asObj(t);
    if (!tool) continue;
    for (const [key, type] of Object.entries(GEMINI_SERVER_TOOLS)) {
      if (tool[key] === undefined) continue;
      // Gemini bills grounding once per grounded request (2.x); it takes no call limit.
      facts.serverTools.push(type === 'google_search' ? { type, maxCalls: 1 } : { type });
    }
  }
  const config = asObj(body.generationConfig ?? body.generation_config);
  const n = count(config?.candidateCount);
  if (n !== undefined && n > 1) facts.n = n;
  const thinking = asObj(config?.thinkingConfig);
  if (thinking?.thinkingBudget === 0) facts.hiddenOutput = false;
}

/** Reads the facts of a request body of `format`. */
export function readRequest(format: UsageFormat, body: Json | undefined): RequestFacts {
  const facts = blank();
  if (!body) return facts;
  const tier = asStr(body.service_tier);
  if (tier !== undefined) facts.serviceTier = tier;
  switch (format) {
    case 'openai-chat':
    case 'openai-completions':
      readChat(facts, body);
      break;
    case 'openai-responses':
      readResponses(facts, body);
      break;
    case 'anthropic-messages':
      readAnthropic(facts, body);
      break;
    case 'gemini':
      readGemini(facts, body);
      break;
    case 'openai-embeddings':
    case 'cohere-chat':
      break;
  }
  return facts;
}
