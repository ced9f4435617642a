/**
 * The tokenizer Till holds OpenAI-family input by (src/core/estimate/tokenCount.ts): exact for ordinary
 * text, and an upper bound by bytes for text built to make it slow (which it never tokenizes).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base';
import { describe, expect, it } from 'vitest';
import { BpeRanks } from '../src/core/estimate/bpe';
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

  it('counts as the reference tokenizer does in every script, in emoji, in broken text and in random text', () => {
    const samples = [
      "I'm sure they're here; WE'VE SEEN IT'S Done, you'll see, he'd",
      '日本語のテキストです。中文也可以。한국어 텍스트',
      'Привет, мир! Ελληνικά. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया. สวัสดีชาวโลก',
      '😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 e\u0301 Ünïcödé ß ﬁ',
      'lone surrogates \ud800 and \udfff, a NUL \u0000 and a BOM \ufeff',
      '   \n\n\t  a  \r\n\r\n    b\n',
      '12345678901234567890 3.14159 0x1F2E 1e-9 ١٢٣',
      JSON.stringify({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }], tools: [{ type: 'function' }] }),
    ];
    for (const text of samples) expect(count(text), text).toBe(exact(text));
    // Random text from a mixed alphabet and from anywhere in Unicode: bounded, seeded, repeatable.
    let seed = 7;
    const random = () => (seed = (Math.imul(seed, 1103515245) + 12345) & 0x7fffffff) / 0x7fffffff;
    const alphabet = [...'aeiou bcdfgk XYZ 0123 .,;:!?\'"-_/\\\n\t éàü日本🙂\u0301{}[]()<>=+*&^%$#@~`|'];
    for (let n = 0; n < 2_000; n++) {
      let text = '';
      const length = 1 + Math.floor(random() * 60);
      for (let i = 0; i < length; i++)
        text += n % 2 ? alphabet[Math.floor(random() * alphabet.length)] : String.fromCodePoint(Math.floor(random() * 0x2ffff));
      expect(count(text), JSON.stringify(text)).toBe(exact(text));
    }
  });

  it('refuses a rank file that is not one', () => {
    expect(() => new BpeRanks(Buffer.from('IQ== 0\nab!= 1\n'))).toThrow(/line 2: not base64/);
    expect(() => new BpeRanks(Buffer.from('IQ== 0\nIg==\n'))).toThrow(/line 2 is not "base64-token rank"/);
    expect(() => new BpeRanks(Buffer.from('IQ== 0\nIg== one\n'))).toThrow(/line 2 is not "base64-token rank"/);
    const ranks = new BpeRanks(Buffer.from('IQ== 0\nIg== 1\nISI= 2\n'));
    expect(ranks.size).toBe(3);
    expect(ranks.rank(Buffer.from('!"'), 0, 2)).toBe(2);
    expect(ranks.rank(Buffer.from('"!'), 0, 2)).toBe(-1);
    // Ranks that are not their line's index are kept as given, the last line without its newline too.
    const shuffled = new BpeRanks(Buffer.from('IQ== 0\nIg== 7\n\nISI= 3'));
    expect(shuffled.size).toBe(3);
    expect([shuffled.rank(Buffer.from('!'), 0, 1), shuffled.rank(Buffer.from('"'), 0, 1), shuffled.rank(Buffer.from('!"'), 0, 2)]).toEqual([
      0, 7, 3,
    ]);
  });
});
