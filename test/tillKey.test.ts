import { describe, expect, it } from 'vitest';
import { hashTillKey, makeTillKey, newKeyId, parseTillKey, TILL_KEY_LENGTH, tillKeyMatches } from '../src/core/keys/tillKey';

describe('till keys', () => {
  it('look like till_<id>_<secret> and parse back to their id', () => {
    const id = newKeyId();
    const key = makeTillKey(id);
    expect(key).toMatch(/^till_[0-9A-Za-z]{10}_[0-9A-Za-z]{30}$/);
    expect(key).toHaveLength(TILL_KEY_LENGTH);
    expect(parseTillKey(key)).toEqual({ ok: true, id });
  });

  it('carry at least 128 random bits: no two of 10,000 share a secret', () => {
    const secrets = new Set(Array.from({ length: 10_000 }, () => makeTillKey('AAAAAAAAAA').slice(16, 40)));
    expect(secrets.size).toBe(10_000);
    // 24 characters of base62: log2(62^24) ≈ 142.9 bits.
    expect(24 * Math.log2(62)).toBeGreaterThan(128);
  });

  it('catch every single-character typo by checksum, without a lookup', () => {
    const key = makeTillKey(newKeyId());
    for (let i = 5; i < key.length; i++) {
      if (key[i] === '_') continue;
      const typo = key.slice(0, i) + (key[i] === 'a' ? 'b' : 'a') + key.slice(i + 1);
      const parsed = parseTillKey(typo);
      expect(parsed.ok, `typo at ${i}`).toBe(false);
    }
  });

  it('reject truncated or padded copies with a reason that does not echo the key', () => {
    const key = makeTillKey(newKeyId());
    for (const bad of [key.slice(0, -1), key + 'x', key.replace('till_', 'tlil_'), 'till_', '']) {
      const parsed = parseTillKey(bad);
      expect(parsed.ok).toBe(false);
      if (!parsed.ok && bad.length > 10) expect(parsed.reason).not.toContain(bad.slice(16, 30));
    }
  });

  it('are stored as a hash and compared in constant time', () => {
    const key = makeTillKey(newKeyId());
    const hash = hashTillKey(key);
    expect(hash).toMatch(/^[0-9a-f]{64}$/);
    expect(hash).not.toContain(key);
    expect(tillKeyMatches(key, hash)).toBe(true);
    expect(tillKeyMatches(makeTillKey(newKeyId()), hash)).toBe(false);
    expect(tillKeyMatches(key, 'not-hex')).toBe(false);
  });
});
