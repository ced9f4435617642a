/**
 * An incremental scanner of a streamed JSON body that buffers only what it is asked for: each
 * element of a top-level array (Gemini's streamed array), or the values of chosen keys of a
 * top-level object (a plain JSON answer's `usage`), so a large answer (embeddings) costs no
 * memory. Fed raw chunks as they pass, split anywhere; strings and escapes are followed so that a
 * brace or a key inside a string is never taken for structure. A value larger than the cap is
 * skipped (cappedBuffer.ts). Values are handed on as bytes; parsing them is the caller's.
 */
import { CappedBuffer } from './cappedBuffer';

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COLON = 0x3a;
const COMMA = 0x2c;
const LBRACE = 0x7b;
const RBRACE = 0x7d;
const LBRACKET = 0x5b;
const RBRACKET = 0x5d;
const isSpace = (b: number): boolean => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;

// States of the top-level object's keys.
const KEY_EXPECTED = 0;
const IN_KEY = 1;
const COLON_EXPECTED = 2;
const VALUE_EXPECTED = 3;
const IN_VALUE = 4;

/** What a {@link JsonScanner} hands on. */
export interface JsonScanListener {
  /** An element of a top-level array, whole. */
  element(raw: Buffer): void;
  /** The value of a chosen key of a top-level object, whole. */
  value(key: string, raw: Buffer): void;
  /** A top-level value has ended (a body may hold another after it, as NDJSON does). */
  end(): void;
}

/** The top-level keys whose values are kept: objects or arrays, and strings. */
export interface JsonCapture {
  objects: ReadonlySet<string>;
  strings: ReadonlySet<string>;
}

export class JsonScanner {
  private readonly pending: CappedBuffer;
  private depth = 0;
  private inString = false;
  private escaped = false;
  private topIsArray = false;
  private keyState = KEY_EXPECTED;
  private key = '';
  private capturing = false;
  private capturingString = false;
  private captureKey = '';

  constructor(
    maxValueBytes: number,
    private readonly capture: JsonCapture,
    private readonly listener: JsonScanListener,
  ) {
    this.pending = new CappedBuffer(maxValueBytes);
  }

  /** Bytes held for the value being captured. */
  get bufferedBytes(): number {
    return this.pending.length;
  }

  /** Scans `chunk` from `from` on. Never keeps a reference to it. */
  push(chunk: Buffer, from = 0): void {
    const len = chunk.length;
    let captureStart = this.capturing || this.capturingString ? from : -1;
    for (let i = from; i < len; i++) {
      const b = chunk[i]!;
      if (this.inString) {
        if (this.escaped) {
          this.escaped = false;
          // Keys are compared as raw text: keep escapes so `"us\"age"` is not taken for `usage`.
          if (this.keyState === IN_KEY && this.key.length < 64) this.key += `\\${String.fromCharCode(b)}`;
        } else if (b === BACKSLASH) this.escaped = true;
        else if (b === QUOTE) {
          this.inString = false;
          if (this.keyState === IN_KEY) this.keyState = COLON_EXPECTED;
          else if (this.capturingString) {
            this.capturingString = false;
            this.captured(chunk.subarray(captureStart, i + 1));
            captureStart = -1;
          }
        } else if (this.keyState === IN_KEY && this.key.length < 64) this.key += String.fromCharCode(b);
        continue;
      }
      const topObject = this.depth === 1 && !this.topIsArray;
      switch (b) {
        case QUOTE:
          this.inString = true;
          if (topObject) {
            if (this.keyState === KEY_EXPECTED) {
              this.keyState = IN_KEY;
              this.key = '';
            } else if (this.keyState === VALUE_EXPECTED) {
              this.keyState = IN_VALUE;
              if (this.capture.strings.has(this.key)) {
                this.capturingString = true;
                this.captureKey = this.key;
                captureStart = i;
              }
            }
          }
          break;
        case LBRACE:
        case LBRACKET:
          if (this.depth === 0) {
            this.topIsArray = b === LBRACKET;
            this.keyState = KEY_EXPECTED;
          } else if (this.depth === 1) {
            if (this.topIsArray) {
              this.capturing = true;
              this.captureKey = '';
              captureStart = i;
            } else if (this.keyState === VALUE_EXPECTED) {
              this.keyState = IN_VALUE;
              if (this.capture.objects.has(this.key)) {
                this.capturing = true;
                this.captureKey = this.key;
                captureStart = i;
              }
            }
          }
          this.depth++;
          break;
        case RBRACE:
        case RBRACKET:
          if (this.depth > 0) this.depth--;
          if (this.depth === 1 && this.capturing) {
            this.capturing = false;
            this.captured(chunk.subarray(captureStart, i + 1));
            captureStart = -1;
          } else if (this.depth === 0) {
            this.keyState = KEY_EXPECTED;
            this.listener.end();
          }
          break;
        case COLON:
          if (topObject && this.keyState === COLON_EXPECTED) this.keyState = VALUE_EXPECTED;
          break;
        case COMMA:
          if (topObject) this.keyState = KEY_EXPECTED;
          break;
        default:
          if (topObject && this.keyState === VALUE_EXPECTED && !isSpace(b)) this.keyState = IN_VALUE;
      }
    }
    if ((this.capturing || this.capturingString) && captureStart >= 0) this.pending.keep(chunk.subarray(captureStart, len));
  }

  private captured(last: Buffer): void {
    const whole = this.pending.take(last);
    if (!whole) return;
    if (this.topIsArray) this.listener.element(whole);
    else this.listener.value(this.captureKey, whole);
  }
}
