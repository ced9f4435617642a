/**
 * Duplicate keys in JSON: `{"model":"gpt-5","model":"gpt-4o-mini"}` is valid JSON that parsers
 * read differently (JavaScript and most keep the last, some the first, some refuse it). The
 * broker judges a body (its model, its output cap, what it will cost) by what `JSON.parse`
 * keeps, so a body with a duplicate key is refused rather than forwarded for the upstream to read
 * some other way.
 */

/**
 * The first key that appears twice in one object of `text`, at any depth, or undefined.
 * `text` must be valid JSON (parse it first): the scan trusts its syntax. Keys are compared as
 * parsed, so `"a"` and `"\u0061"` are the same key. Runs on every inspected body: strings are
 * skipped with `indexOf`, so the cost follows the number of tokens, not the bytes of text.
 */
export function duplicateKey(text: string): string | undefined {
  // One entry per open container: the keys seen so far of an object, or null for an array. A
  // short list for the common small object; a Set past that, so a hostile object with a huge
  // number of keys costs linear time, not quadratic.
  const stack: (string[] | Set<string> | null)[] = [];
  let expectKey = false;
  const n = text.length;
  for (let i = 0; i < n; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      const end = stringEnd(text, i);
      if (expectKey) {
        const raw = text.slice(i + 1, end);
        const key = raw.includes('\\') ? (JSON.parse(text.slice(i, end + 1)) as string) : raw;
        const keys = stack[stack.length - 1]!;
        if (Array.isArray(keys)) {
          if (keys.includes(key)) return key;
          keys.push(key);
          if (keys.length > 16) stack[stack.length - 1] = new Set(keys);
        } else {
          if (keys.has(key)) return key;
          keys.add(key);
        }
        expectKey = false;
      }
      i = end;
    } else if (c === 0x7b) {
      stack.push([]);
      expectKey = true;
    } else if (c === 0x5b) {
      stack.push(null);
    } else if (c === 0x7d || c === 0x5d) {
      stack.pop();
      expectKey = false;
    } else if (c === 0x2c) {
      expectKey = stack[stack.length - 1] != null;
    }
  }
  return undefined;
}

/** The index of the quote that closes the string opening at `start`. */
function stringEnd(text: string, start: number): number {
  let j = start + 1;
  for (;;) {
    j = text.indexOf('"', j);
    if (j < 0) return text.length;
    let backslashes = 0;
    for (let k = j - 1; text.charCodeAt(k) === 0x5c; k--) backslashes++;
    if (backslashes % 2 === 0) return j;
    j++;
  }
}
