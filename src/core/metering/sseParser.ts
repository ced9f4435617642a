/**
 * An incremental Server-Sent Events parser: fed raw chunks as they pass, it hands on each complete
 * event (its `event:` name, its `data:` lines joined, and its bytes as received). Handles `\n`,
 * `\r\n` and `\r` line endings, multi-line `data:`, comments, a byte-order mark, and chunk
 * boundaries anywhere, even inside a UTF-8 sequence: bytes are split into events before any
 * decoding. Keeps at most one partial event, capped (cappedBuffer.ts).
 */
import { CappedBuffer } from './cappedBuffer';

const LF = 0x0a;
const CR = 0x0d;
const COLON = 0x3a;

/** Receives each complete event that has data (per the SSE spec, one without is not dispatched). */
export type SseListener = (event: string | undefined, data: string, raw: Buffer) => void;

/** The value of an event that is exactly one `data:` line and its line endings, else undefined. */
function singleDataLine(raw: Buffer): string | undefined {
  // "data:"
  if (raw.length < 6 || raw[0] !== 0x64 || raw[1] !== 0x61 || raw[2] !== 0x74 || raw[3] !== 0x61 || raw[4] !== COLON) return undefined;
  const lf = raw.indexOf(LF, 5);
  const cr = raw.indexOf(CR, 5);
  const end = lf < 0 ? cr : cr < 0 ? lf : Math.min(lf, cr);
  if (end < 0) return undefined;
  for (let i = end; i < raw.length; i++) if (raw[i] !== LF && raw[i] !== CR) return undefined;
  return raw.toString('utf8', raw[5] === 0x20 ? 6 : 5, end);
}

export class SseParser {
  private readonly pending: CappedBuffer;
  /** The previous chunk ended with CR: a leading LF in the next chunk completes that CRLF. */
  private pendingCR = false;
  /** Bytes of the current line have been seen (in an earlier chunk), so it is not blank. */
  private lineOpen = false;
  private firstEvent = true;

  constructor(
    maxEventBytes: number,
    private readonly listener: SseListener,
  ) {
    this.pending = new CappedBuffer(maxEventBytes);
  }

  /** Bytes held for the event being parsed. */
  get bufferedBytes(): number {
    return this.pending.length;
  }

  /** Parses `chunk` from `from` on. Never keeps a reference to it. */
  push(chunk: Buffer, from = 0): void {
    const len = chunk.length;
    let pos = from;
    // Where the next event's raw bytes begin. A LF completing a CRLF split across chunks is not a
    // line of its own; if that CR ended an event, the LF goes to the next event's raw, so that
    // the raws of all events still add up to the stream.
    let eventStart = from;
    if (this.pendingCR) {
      this.pendingCR = false;
      if (chunk[pos] === LF) pos++;
    }
    // Next LF / CR at or after pos; -2 = not looked up yet, -1 = none left in this chunk. Kept
    // across lines so a stream with no CR at all is not rescanned for one on every line.
    let nextLF = -2;
    let nextCR = -2;
    while (pos < len) {
      if (nextLF !== -1 && nextLF < pos) nextLF = chunk.indexOf(LF, pos);
      if (nextCR !== -1 && nextCR < pos) nextCR = chunk.indexOf(CR, pos);
      const t = nextLF === -1 ? nextCR : nextCR === -1 ? nextLF : Math.min(nextLF, nextCR);
      if (t === -1) {
        this.lineOpen = true;
        break;
      }
      const blank = t === pos && !this.lineOpen;
      this.lineOpen = false;
      let end = t + 1;
      if (chunk[t] === CR) {
        if (end < len) {
          if (chunk[end] === LF) end++;
        } else this.pendingCR = true;
      }
      pos = end;
      if (blank) {
        const raw = this.pending.take(chunk.subarray(eventStart, pos));
        if (raw) this.parseEvent(raw);
        eventStart = pos;
      }
    }
    if (eventStart < len) this.pending.keep(chunk.subarray(eventStart, len));
  }

  private parseEvent(raw: Buffer): void {
    if (!this.firstEvent) {
      // Most events are one `data:` line: decode just its value, no line splitting.
      const data = singleDataLine(raw);
      if (data !== undefined) return this.listener(undefined, data, raw);
    }
    let text = raw.toString('utf8');
    if (this.firstEvent) {
      this.firstEvent = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    let event: string | undefined;
    let data: string | undefined;
    for (const line of text.split(/\r\n|\r|\n/)) {
      if (line === '' || line.charCodeAt(0) === COLON /* a comment */) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.charCodeAt(0) === 0x20) value = value.slice(1);
      if (field === 'data') data = data === undefined ? value : `${data}\n${value}`;
      else if (field === 'event') event = value;
    }
    if (data === undefined) return;
    this.listener(event || undefined, data, raw);
  }
}
