/**
 * What the tokenizer costs when a hold needs it (holds/plan.ts tokenizes a body only when its byte
 * bound would refuse the request or lower its output): loading it, and counting agent-shaped
 * chat bodies of 48 KB (a Claude Code system prompt) and 400 KB (a long session), in this
 * process, with Till's own counter (src/core/estimate/tokenCount.ts).
 *
 * The text is real: this repository's TypeScript and Markdown, as an agent's context would carry
 * source files and notes. A body of text made to be slow (unseen words) is counted too.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { counter, requestTokens } from '../src/core/estimate/tokenCount';

export interface TokenizerSize {
  label: string;
  bytes: number;
  tokens: number;
  /** Median milliseconds to count the body (after a first count). */
  ms: number;
}

export interface TokenizerResult {
  /** Milliseconds of the first count of a small body (loading the encoding included). */
  loadMs: number;
  /** RSS added by loading it (MiB). */
  loadRssMiB: number;
  sizes: TokenizerSize[];
}

const ROOT = resolve(__dirname, '..');

/** Source and notes of this repository, in a stable order. */
function corpus(): string {
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (/\.(ts|md)$/.test(entry.name)) files.push(readFileSync(path, 'utf8'));
    }
  };
  walk(join(ROOT, 'src'));
  files.push(readFileSync(join(ROOT, 'README.md'), 'utf8'));
  return files.join('\n\n');
}

/** A chat body whose messages carry `bytes` of `text`: a system prompt, then user and assistant turns. */
function chatBody(text: string, bytes: number): Record<string, unknown> {
  let all = text;
  while (all.length < bytes) all += `\n${text}`;
  all = all.slice(0, bytes);
  const system = all.slice(0, Math.min(48_000, all.length));
  const messages: { role: string; content: string }[] = [{ role: 'system', content: system }];
  for (let at = system.length, i = 0; at < all.length; at += 8_000, i++)
    messages.push({ role: i % 2 === 0 ? 'user' : 'assistant', content: all.slice(at, at + 8_000) });
  return { model: 'gpt-5', messages };
}

/** Lower-case words of 4 to 10 letters no text has: every one is new to the tokenizer's cache. */
function unseenWords(bytes: number, seed: number): string {
  const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  let out = '';
  while (out.length < bytes) {
    const n = 4 + Math.floor(random() * 7);
    for (let i = 0; i < n; i++) out += String.fromCharCode(97 + Math.floor(random() * 26));
    out += ' ';
  }
  return out;
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

export function measureTokenizer(): TokenizerResult {
  const rss0 = process.memoryUsage().rss;
  const t0 = performance.now();
  const count = counter('o200k_base');
  count('warm up');
  const loadMs = performance.now() - t0;
  const loadRssMiB = (process.memoryUsage().rss - rss0) / 2 ** 20;
  const text = corpus();
  // Each a function of the round: the unseen words are new in every round.
  const bodies: [string, (round: number) => Record<string, unknown>][] = [
    ['48 KB agent context', () => chatBody(text, 48_000)],
    ['400 KB agent context', () => chatBody(text, 400_000)],
    ['400 KB of words never seen before', (round) => chatBody(unseenWords(400_000, 1 + round), 400_000)],
  ];
  const sizes = bodies.map(([label, make]): TokenizerSize => {
    const first = make(0);
    const tokens = requestTokens('openai-chat', first, count) ?? 0;
    const times: number[] = [];
    for (let round = 1; round <= 7; round++) {
      const body = make(round);
      const t = performance.now();
      requestTokens('openai-chat', body, count);
      times.push(performance.now() - t);
    }
    return { label, bytes: Buffer.byteLength(JSON.stringify(first)), tokens, ms: median(times) };
  });
  return { loadMs, loadRssMiB, sizes };
}
