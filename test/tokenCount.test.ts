/**
 * The tokenizer Till holds OpenAI-family input by (src/core/estimate/tokenCount.ts): exact for ordinary
 * text, and an upper bound by bytes for text built to make it slow (which it never tokenizes).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base';
import { describe, expect, it } from 'vitest';
import { counter } from '../src/core/estimate/tokenCount';

const count = counter('o200k_base');
const exact = (text: string) => countTokens(text, { disallowedSpecial: new Set() });

/** This repository's source: real code and prose. */
function source(): string {
  const out: string[] = [];
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, e.name);
      if (e.isDirectory()) walk(path);
      else if (e.name.endsWith('.ts')) out.push(readFileSync(path, 'utf8'));
    }
  };
  walk(join(__dirname, '..', 'src'));
  return out.join('\n');
}

describe('counting tokens', () => {
  it('counts ordinary text exactly, special-token look-alikes as text', () => {
    const text = source().slice(0, 200_000);
    expect(count(text)).toBe(exact(text));
    expect(count('Hello, world! 你好，世界。 ❤️ <|endoftext|>')).toBe(exact('Hello, world! 你好，世界。 ❤️ <|endoftext|>'));
  });

  it('bounds runs built to be slow by their bytes, without tokenizing them', () => {
    // The tokenizer's work is quadratic in such a run: seconds for each of these, the broker
    // stalled meanwhile. Each is counted as its bytes (an upper bound: a token is at least a
    // byte), plus the 2 tokens its neighbours may gain and the space that stands in for it.
    for (const run of ['a'.repeat(100_000), '中'.repeat(50_000), ' '.repeat(50_000), '='.repeat(50_000), '!🙂'.repeat(25_000)]) {
      expect(count(run)).toBe(Buffer.byteLength(run) + 3);
    }
    // Runs of 1,000 letters between spaces: each cut out the same way.
    const words = `${'xq'.repeat(500)} `.repeat(400);
    expect(count(words)).toBeGreaterThanOrEqual(400 * 1_002);
    expect(count(words)).toBeLessThanOrEqual(Buffer.byteLength(words) + 3 * 400);
  });

  it('an upper bound where a run is cut out: never fewer tokens than the tokenizer counts', () => {
    const text = `${source().slice(0, 5_000)} ${'a'.repeat(3_000)} ${source().slice(5_000, 10_000)}`;
    expect(count(text)).toBeGreaterThanOrEqual(exact(text));
  });
});
