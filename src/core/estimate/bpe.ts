/**
 * A byte-pair-encoding token counter that fits in a few megabytes: the guarantee is that it
 * counts exactly the tokens tiktoken's encoder produces for the same text and rank file (special
 * tokens are not recognised: their text counts as text, as it is billed).
 *
 * Why not a tokenizer package: the JavaScript ones keep every token as a string in a map and as
 * an array of bytes (some 55 MB for o200k_base, in the broker's own process, and 200 ms to
 * build); counting needs neither. Here the ranks stay one buffer of bytes and one open-addressing
 * table of integers over it (about 4 MB), decoded a chunk at a time from the rank file tiktoken
 * publishes (`base64-token rank` per line; whole, its 3.6 MB would stay in the process until a
 * collection freed them), and a word piece is merged the way tiktoken merges it: the adjacent
 * pair with the lowest rank first, until no pair is a token.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';

/** How much of a rank file is read at a time: the file (3.6 MB for o200k_base) is never whole in memory. */
const CHUNK = 64 * 1024;

/** The ranks of one encoding: token bytes to their rank, looked up without building strings. */
export class BpeRanks {
  /** Every token's bytes, one after another. */
  private readonly bytes: Buffer;
  /** Where token i starts in {@link bytes}; token i ends where token i + 1 starts. */
  private readonly starts: Uint32Array;
  /** Token i's rank; undefined while every rank is its line's index (tiktoken's files are so). */
  private readonly ranks: Int32Array | undefined;
  /** Open addressing: token index + 1 at its hash's slot or the next free one; 0 is empty. */
  private readonly table: Int32Array;
  private readonly mask: number;
  private readonly count: number;

  /** Reads a tiktoken rank file, a chunk at a time. */
  static read(file: string): BpeRanks {
    const fd = openSync(file, 'r');
    try {
      const decoder = new RankFileDecoder(fstatSync(fd).size);
      const chunk = Buffer.allocUnsafe(CHUNK);
      for (let n: number; (n = readSync(fd, chunk, 0, CHUNK, null)) > 0;) decoder.push(chunk, n);
      return new BpeRanks(decoder);
    } finally {
      closeSync(fd);
    }
  }

  /** Ranks from a tiktoken rank file's bytes (`base64-token rank` per line), or from a decoder that read one. */
  constructor(rankFile: Buffer | RankFileDecoder) {
    let decoder: RankFileDecoder;
    if (rankFile instanceof RankFileDecoder) decoder = rankFile;
    else {
      decoder = new RankFileDecoder(rankFile.length);
      decoder.push(rankFile, rankFile.length);
    }
    const n = decoder.end();
    this.bytes = decoder.bytes;
    this.starts = decoder.starts;
    this.ranks = decoder.ranks;
    this.count = n;
    let size = 1;
    while (size < n * 2) size *= 2;
    this.table = new Int32Array(size);
    this.mask = size - 1;
    for (let i = 0; i < n; i++) {
      let slot = hash(this.bytes, this.starts[i]!, this.starts[i + 1]!) & this.mask;
      while (this.table[slot] !== 0) slot = (slot + 1) & this.mask;
      this.table[slot] = i + 1;
    }
  }

  /** The number of tokens. */
  get size(): number {
    return this.count;
  }

  /** The rank of `bytes[from, to)` as one token, or -1 when it is none. */
  rank(bytes: Uint8Array, from: number, to: number): number {
    const length = to - from;
    let slot = hash(bytes, from, to) & this.mask;
    for (;;) {
      const entry = this.table[slot]!;
      if (entry === 0) return -1;
      const start = this.starts[entry - 1]!;
      if (this.starts[entry]! - start === length && this.same(start, bytes, from, length))
        return this.ranks ? this.ranks[entry - 1]! : entry - 1;
      slot = (slot + 1) & this.mask;
    }
  }

  private same(start: number, bytes: Uint8Array, from: number, length: number): boolean {
    for (let k = 0; k < length; k++) if (this.bytes[start + k] !== bytes[from + k]) return false;
    return true;
  }
}

const NEWLINE = 0x0a;
const SPACE = 0x20;
const PAD = 64;
/** A byte's base64 value (`=` is {@link PAD}, anything else not base64 -1). */
const BASE64 = (() => {
  const table = new Int8Array(256).fill(-1);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  for (let i = 0; i < alphabet.length; i++) table[alphabet.charCodeAt(i)] = i;
  table[0x3d] = PAD;
  return table;
})();

/** The shortest line a rank file can have: one byte's token in base64 (4), a space, one digit, a newline. */
const SHORTEST_LINE = 7;

/**
 * Decodes a rank file pushed in chunks, in place: base64 into one buffer of bytes, no string per
 * token and no line array. Its arrays are sized for the most lines the file could hold: what is
 * never written of them is never touched, so it takes no memory.
 */
class RankFileDecoder {
  readonly bytes: Buffer;
  readonly starts: Uint32Array;
  ranks: Int32Array | undefined;
  private used = 0;
  /** Tokens (lines with one) so far. */
  private n = 0;
  /** Within a line: 0 none begun, 1 its token, 2 its rank. */
  private part = 0;
  private bits = 0;
  private bitCount = 0;
  private rank = 0;
  private digits = 0;

  constructor(fileSize: number) {
    this.bytes = Buffer.allocUnsafeSlow(Math.ceil((fileSize * 3) / 4));
    this.starts = new Uint32Array(Math.ceil(fileSize / SHORTEST_LINE) + 2);
  }

  /** Decodes `chunk[0, length)`. Throws naming the line when it is not `base64-token rank`. */
  push(chunk: Buffer, length: number): void {
    for (let at = 0; at < length; at++) {
      const c = chunk[at]!;
      if (c === NEWLINE) {
        if (this.part !== 0) this.endLine();
        continue;
      }
      if (this.part === 0) {
        this.starts[this.n] = this.used;
        this.part = 1;
      }
      if (this.part === 2) {
        const digit = c - 0x30;
        if (digit < 0 || digit > 9) this.digits = -Infinity;
        this.rank = this.rank * 10 + digit;
        this.digits++;
      } else if (c === SPACE) {
        if (this.starts[this.n] === this.used) this.malformed();
        this.part = 2;
      } else {
        // base64, four characters to three bytes, `=` padding at the end
        const v = BASE64[c]!;
        if (v === PAD) continue;
        if (v < 0) throw new Error(`rank file line ${this.n + 1}: not base64`);
        this.bits = (this.bits << 6) | v;
        this.bitCount += 6;
        if (this.bitCount >= 8) {
          this.bitCount -= 8;
          this.bytes[this.used++] = (this.bits >> this.bitCount) & 0xff;
        }
      }
    }
  }

  /** Ends the file; returns the number of tokens. */
  end(): number {
    if (this.part !== 0) this.endLine();
    this.starts[this.n] = this.used;
    return this.n;
  }

  private endLine(): void {
    if (this.part !== 2 || !(this.digits > 0)) this.malformed();
    if (this.ranks === undefined && this.rank !== this.n) {
      // The first rank that is not its line's index: from now on they are kept.
      this.ranks = new Int32Array(this.starts.length);
      for (let i = 0; i < this.n; i++) this.ranks[i] = i;
    }
    if (this.ranks) this.ranks[this.n] = this.rank;
    this.n++;
    this.part = 0;
    this.bits = 0;
    this.bitCount = 0;
    this.rank = 0;
    this.digits = 0;
  }

  private malformed(): never {
    throw new Error(`rank file line ${this.n + 1} is not "base64-token rank"`);
  }
}

/** FNV-1a over a slice of bytes. */
function hash(bytes: Uint8Array, from: number, to: number): number {
  let h = 0x811c9dc5;
  for (let k = from; k < to; k++) h = Math.imul(h ^ bytes[k]!, 0x01000193);
  return h >>> 0;
}

const NONE = 0x7fffffff;

/**
 * Tokens of one word piece (`bytes[0, length)`) merged as tiktoken merges it. `starts` and
 * `pairRanks` are scratch space of at least `length + 1` entries.
 */
function mergedTokens(ranks: BpeRanks, bytes: Uint8Array, length: number, starts: Int32Array, pairRanks: Int32Array): number {
  // Part i runs from starts[i] to starts[i + 1]; pairRanks[i] is the rank of parts i and i + 1 joined.
  let parts = length;
  for (let i = 0; i <= length; i++) starts[i] = i;
  const pairRank = (i: number): number => {
    if (i < 0 || i + 2 > parts) return NONE;
    const r = ranks.rank(bytes, starts[i]!, starts[i + 2]!);
    return r < 0 ? NONE : r;
  };
  for (let i = 0; i < parts - 1; i++) pairRanks[i] = pairRank(i);
  for (;;) {
    let best = NONE;
    let at = -1;
    for (let i = 0; i < parts - 1; i++)
      if (pairRanks[i]! < best) {
        best = pairRanks[i]!;
        at = i;
      }
    if (at < 0) return parts;
    // Join parts at and at + 1: drop the boundary between them.
    starts.copyWithin(at + 1, at + 2, parts + 1);
    pairRanks.copyWithin(at + 1, at + 2, parts);
    parts--;
    pairRanks[at] = pairRank(at);
    if (at > 0) pairRanks[at - 1] = pairRank(at - 1);
  }
}

/** Pieces whose count took merging, remembered until this many are known (then forgotten at once). */
const PIECE_CACHE = 100_000;

/**
 * A counter over `ranks`: the text is cut into word pieces by `split` (the encoding's pattern,
 * with the `g` and `u` flags), each piece a token of its own or merged into tokens.
 */
export function bpeCounter(ranks: BpeRanks, split: RegExp): (text: string) => number {
  let bytes = Buffer.allocUnsafeSlow(1024);
  let starts = new Int32Array(1025);
  let pairRanks = new Int32Array(1025);
  const cache = new Map<string, number>();
  return (text) => {
    let tokens = 0;
    for (const [piece] of text.matchAll(split)) {
      if (bytes.length < piece.length * 3) {
        bytes = Buffer.allocUnsafeSlow(piece.length * 3);
        starts = new Int32Array(bytes.length + 1);
        pairRanks = new Int32Array(bytes.length + 1);
      }
      const length = utf8Into(piece, bytes);
      if (length === 0) continue;
      if (ranks.rank(bytes, 0, length) >= 0) {
        tokens++;
        continue;
      }
      let n = cache.get(piece);
      if (n === undefined) {
        n = mergedTokens(ranks, bytes, length, starts, pairRanks);
        if (cache.size >= PIECE_CACHE) cache.clear();
        cache.set(piece, n);
      }
      tokens += n;
    }
    return tokens;
  };
}

/**
 * Writes `text` as UTF-8 (what tiktoken encodes) into `out` (3 bytes per UTF-16 unit at most),
 * returning its length. ASCII is copied by hand: most pieces are, and a native call per piece
 * costs more than the copy.
 */
function utf8Into(text: string, out: Buffer): number {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c >= 128) return out.write(text, 0, 'utf8');
    out[i] = c;
  }
  return text.length;
}
