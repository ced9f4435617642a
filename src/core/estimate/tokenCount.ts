/**
 * Input tokens of OpenAI-family requests, counted as OpenAI bills them: the models' tokenizer is
 * public (o200k_base for GPT-4o and later; older models, on cl100k_base, are held by their bytes
 * rather than ship a second tokenizer for them), and so is how a chat is
 * rendered around its messages (3 tokens per message, 1 per name, 3 to prime the answer). The
 * count is an upper bound of what the upstream bills for the text: parts OpenAI renders more
 * compactly than their JSON (tool definitions, a response schema) are counted as their JSON.
 *
 * The tokenizer is loaded by the first request that needs it (some 40 ms and 11 MB, once: 4 MB of
 * ranks, the rest the Unicode tables its word-splitting pattern reads): one
 * whose input must be counted exactly, or the first stream held in slices, which is settled by
 * counting its text if it is cut (see holds/plan.ts). Keys without token or spend limits load it
 * only when a stream of theirs is cut: no limit can be overrun while it loads.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { asArray, asObj, type Json } from '../json';
import { BpeRanks, bpeCounter } from './bpe';
import type { UsageFormat } from '../providers/wire';

/** A public tokenizer: how many tokens `text` encodes to, special-token text counted as text. */
export type CountTokens = (text: string) => number;

/** The encodings Till can count with. */
export type Encoding = 'o200k_base';

/** The encoding of an OpenAI model, by its id (a `vendor/` prefix is dropped); undefined when Till has none for it. */
export function encodingOf(model: string | undefined): Encoding | undefined {
  if (!model) return undefined;
  const m = model.toLowerCase().replace(/^openai\//, '');
  return /^(gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-6|o1|o3|o4|chatgpt-4o|gpt-oss)/.test(m) ? 'o200k_base' : undefined;
}

const loaded = new Map<Encoding, CountTokens>();

/** The counter of an encoding, loaded once. */
export function counter(encoding: Encoding): CountTokens {
  let count = loaded.get(encoding);
  if (!count) {
    count = loadCounter(encoding);
    loaded.set(encoding, count);
  }
  return count;
}

/**
 * Runs of one kind of character (letters, spaces, or punctuation) at least this long. The
 * tokenizer's work on one grows with the square of its length (100 KB of "a" takes seconds and
 * would block the broker; 400 KB in runs of 1,000 letters, 0.4 s), and a client can send them on
 * purpose: such a run is counted as its bytes instead, an upper bound (every token is at least
 * one byte), plus {@link RUN_BOUNDARY_TOKENS}. Prompts rarely have one (digits, hex and base64
 * break every few characters; a word is far shorter), and when they do it costs a little hold.
 */
const LONG_RUN = /[\p{L}\p{M}]{128,}|\s{128,}|[^\s\p{L}\p{M}\p{N}]{128,}/gu;
/** Run length at which {@link LONG_RUN} applies. */
const RUN = 128;
const LETTER = 1;
const SPACE = 2;
const OTHER = 3;

/**
 * Whether `text` may hold a {@link LONG_RUN}, by a scan much cheaper than the regex (whose Unicode
 * classes cost about as much as counting the text): ASCII characters have their class (a digit
 * belongs to none), any other character may be of any class, so no run the regex would find is
 * missed; a stretch the scan flags is then cut out by the regex, exactly.
 */
function mayHaveLongRun(text: string): boolean {
  let cls = 0;
  let start = 0;
  /** The last position of an ASCII character (non-ASCII ones after it may start a new run). */
  let fixed = -1;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 128) {
      const k =
        (c >= 97 && c <= 122) || (c >= 65 && c <= 90) ? LETTER : c === 32 || (c >= 9 && c <= 13) ? SPACE : c >= 48 && c <= 57 ? 0 : OTHER;
      if (k !== cls) {
        start = k === 0 ? i + 1 : fixed + 1;
        cls = k;
      }
      fixed = i;
    }
    if (cls !== 0 && i - start + 1 >= RUN) return true;
    if (cls === 0 && c >= 128 && i - fixed >= RUN) return true;
  }
  return false;
}

/** Tokens no tokenizer merges across: cutting a run out may split its neighbours once on each side. */
const RUN_BOUNDARY_TOKENS = 2;
/**
 * How o200k_base cuts text into word pieces before merging each (tiktoken's pattern, with its
 * case-insensitive contractions spelled out: JavaScript has no inline `(?i:)`).
 */
const CONTRACTION = String.raw`(?:'(?:[sS]|[dD]|[mM]|[tT]|[lL][lL]|[vV][eE]|[rR][eE]))?`;
const O200K_SPLIT = new RegExp(
  [
    String.raw`[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+${CONTRACTION}`,
    String.raw`[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*${CONTRACTION}`,
    String.raw`\p{N}{1,3}`,
    String.raw` ?[^\s\p{L}\p{N}]+[\r\n/]*`,
    String.raw`\s*[\r\n]+`,
    String.raw`\s+(?!\S)`,
    String.raw`\s+`,
  ].join('|'),
  'gu',
);

/**
 * The encoding's rank file (tiktoken's, as published): beside the bundle (dist/tokenizers/, copied
 * there by the build), or in the tokenizer package when Till runs from its sources.
 */
function rankFile(encoding: Encoding): string {
  const beside = join(__dirname, 'tokenizers', `${encoding}.tiktoken`);
  return existsSync(beside) ? beside : require.resolve(`gpt-tokenizer/data/${encoding}.tiktoken`);
}

function loadCounter(encoding: Encoding): CountTokens {
  const count = bpeCounter(BpeRanks.read(rankFile(encoding)), O200K_SPLIT);
  return (text) => {
    if (text.length === 0) return 0;
    if (text.length < RUN || !mayHaveLongRun(text)) return count(text);
    let runs = 0;
    const rest = text.replace(LONG_RUN, (run) => {
      runs += Buffer.byteLength(run) + RUN_BOUNDARY_TOKENS;
      return ' ';
    });
    return runs === 0 ? count(text) : count(rest) + runs;
  };
}

/** Tokens of a value as OpenAI sees it in a message: text as is, anything else as its JSON. */
function valueTokens(count: CountTokens, value: unknown): number {
  if (typeof value === 'string') return count(value);
  if (value === undefined || value === null) return 0;
  return count(JSON.stringify(value));
}

/** Tokens of a message's content: a string, or parts of which the text ones count here (images are bound apart). */
function contentTokens(count: CountTokens, content: unknown): number {
  if (typeof content === 'string') return count(content);
  let n = 0;
  for (const p of asArray(content)) {
    const part = asObj(p);
    if (!part) continue;
    const type = part.type;
    if (type === 'text' || type === 'input_text' || type === 'output_text') n += valueTokens(count, part.text);
    else if (type === 'refusal') n += valueTokens(count, part.refusal);
    // Images and files are bound apart (requestFacts.ts); audio is billed as audio tokens, not text.
    else if (type !== 'image_url' && type !== 'input_image' && type !== 'file' && type !== 'input_file' && type !== 'input_audio')
      n += valueTokens(count, part);
  }
  return n;
}

/**
 * A chat's input tokens, as OpenAI's cookbook counts them for its chat models: per message 3 +
 * its role + its content (+ 1 and its name when named); other fields (tool calls, a tool call's
 * id) as their JSON; 3 to prime the answer; tools and a response schema as their JSON plus 12.
 */
function chatTokens(count: CountTokens, body: Json): number {
  let n = 3;
  for (const m of asArray(body.messages)) {
    const message = asObj(m);
    if (!message) continue;
    n += 3;
    for (const [field, value] of Object.entries(message)) {
      n += field === 'content' ? contentTokens(count, value) : valueTokens(count, value);
      if (field === 'name') n += 1;
    }
  }
  if (body.tools !== undefined) n += valueTokens(count, body.tools) + 12;
  if (body.functions !== undefined) n += valueTokens(count, body.functions) + 12;
  if (asObj(body.response_format)?.json_schema !== undefined) n += valueTokens(count, body.response_format) + 12;
  return n;
}

/**
 * A Responses request's input tokens, counted like a chat: the instructions and each input item
 * as a message (items that are not messages, such as function calls and their outputs, as their
 * JSON), tools and a text format as their JSON plus 12.
 */
function responsesTokens(count: CountTokens, body: Json): number {
  let n = 3;
  if (typeof body.instructions === 'string') n += 4 + count(body.instructions);
  if (typeof body.input === 'string') n += 4 + count(body.input);
  for (const i of asArray(body.input)) {
    const item = asObj(i);
    if (!item) continue;
    n += 4;
    if (item.type === undefined || item.type === 'message') n += valueTokens(count, item.role) + contentTokens(count, item.content);
    else n += valueTokens(count, item);
  }
  if (body.tools !== undefined) n += valueTokens(count, body.tools) + 12;
  if (asObj(body.text)?.format !== undefined) n += valueTokens(count, asObj(body.text)!.format) + 12;
  return n;
}

/**
 * The input tokens of a request of an OpenAI-shaped format, counted with `count`, or undefined
 * for a format whose rendering Till does not know (it is then held by its bytes).
 */
export function requestTokens(format: UsageFormat, body: Json, count: CountTokens): number | undefined {
  switch (format) {
    case 'openai-chat':
      return chatTokens(count, body);
    case 'openai-responses':
      return responsesTokens(count, body);
    case 'openai-completions':
    case 'openai-embeddings': {
      const input = format === 'openai-completions' ? body.prompt : body.input;
      if (typeof input === 'string') return count(input);
      return valueTokens(count, input);
    }
    default:
      return undefined;
  }
}
