/**
 * Till keys: `till_<id>_<secret><check>`.
 *
 * - `id`: 10 base62 characters, public (shown in `till ls`), so lookup needs no scan.
 * - `secret`: 24 base62 characters, about 143 random bits.
 * - `check`: CRC-32 of everything before it, 6 base62 characters, so a typo is caught
 *   without a lookup (the same idea as GitHub's token checksums).
 *
 * Only a SHA-256 hash of the whole key is stored. A key has enough entropy that a slow
 * password hash would add cost without adding safety.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { crc32 } from 'node:zlib';

const ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
const PREFIX = 'till_';
const ID_LENGTH = 10;
const SECRET_LENGTH = 24;
const CHECK_LENGTH = 6;
const SHAPE = /^till_([0-9A-Za-z]{10})_([0-9A-Za-z]{30})$/;

/** Total length of a till key. */
export const TILL_KEY_LENGTH = PREFIX.length + ID_LENGTH + 1 + SECRET_LENGTH + CHECK_LENGTH;

function randomBase62(length: number): string {
  let out = '';
  while (out.length < length) {
    for (const byte of randomBytes(length * 2)) {
      // 248 = 4 * 62: rejecting the rest keeps every character equally likely.
      if (byte < 248 && out.length < length) out += ALPHABET[byte % 62];
    }
  }
  return out;
}

function base62Fixed(n: number, length: number): string {
  let out = '';
  for (let i = 0; i < length; i++) {
    out = ALPHABET[n % 62] + out;
    n = Math.floor(n / 62);
  }
  return out;
}

function checksum(body: string): string {
  return base62Fixed(crc32(body), CHECK_LENGTH);
}

/** A new key id (public). */
export function newKeyId(): string {
  return randomBase62(ID_LENGTH);
}

/** Makes a new till key for a given id. */
export function makeTillKey(id: string): string {
  const body = `${PREFIX}${id}_${randomBase62(SECRET_LENGTH)}`;
  return body + checksum(body);
}

/** The stored form of a key: hex SHA-256. */
export function hashTillKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

/** Constant-time comparison of a presented key against a stored hash. */
export function tillKeyMatches(key: string, storedHash: string): boolean {
  const a = createHash('sha256').update(key).digest();
  const b = Buffer.from(storedHash, 'hex');
  return a.length === b.length && timingSafeEqual(a, b);
}

/** True when a string claims to be a till key (it may still be malformed). */
export function looksLikeTillKey(value: string): boolean {
  return value.startsWith(PREFIX);
}

export type ParsedTillKey = { ok: true; id: string } | { ok: false; reason: string };

/** Checks shape and checksum without any lookup. Never echoes the key in a reason. */
export function parseTillKey(value: string): ParsedTillKey {
  const m = SHAPE.exec(value);
  if (!m) return { ok: false, reason: `malformed till key: expected ${TILL_KEY_LENGTH} characters "till_<id>_<secret>"` };
  const body = value.slice(0, -CHECK_LENGTH);
  if (checksum(body) !== value.slice(-CHECK_LENGTH)) {
    return { ok: false, reason: 'malformed till key: checksum mismatch (a typo or a truncated copy?)' };
  }
  return { ok: true, id: m[1]! };
}
