/**
 * Reading JSON Till did not write (request bodies, upstream answers, files a user may edit): each
 * accessor gives the value when it has the expected shape, and nothing otherwise, never throws.
 */

export type Json = Record<string, unknown>;

/** `v` when it is a plain JSON object. */
export function asObj(v: unknown): Json | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : undefined;
}

/** `v` when it is an array, else an empty one. */
export function asArray(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}

/** `v` when it is a string. */
export function asStr(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

/** True when `v` is a plain JSON object. */
export function isRecord(v: unknown): v is Json {
  return asObj(v) !== undefined;
}
