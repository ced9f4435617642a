/**
 * Bytes waiting for a later write to a file, held outside the JS heap.
 *
 * The ledger's deferred entries and the audit log's lines wait for a write that comes later
 * (the end of the event-loop turn, or 100 ms). Held as strings, on a busy broker many of them
 * outlive a young-generation collection and are copied, some promoted; encoded at once into one
 * reused buffer, they cost the garbage collector nothing. The ledger also checksums the bytes
 * it has just encoded, instead of encoding each entry to UTF-8 twice (checksum, then write).
 */
import { writeSync } from 'node:fs';

const INITIAL_BYTES = 64 * 1024;

export class PendingBytes {
  private buf: Buffer = Buffer.allocUnsafeSlow(INITIAL_BYTES);
  private used = 0;

  /** Bytes held. */
  get length(): number {
    return this.used;
  }

  /**
   * Appends `text` as UTF-8 and returns where it starts and ends in {@link bytes}. `before` and
   * `after` leave that many bytes free (unwritten) on each side, for the caller to fill.
   */
  append(text: string, before = 0, after = 0): { start: number; end: number } {
    // A UTF-16 code unit never takes more than 3 bytes in UTF-8.
    this.room(before + text.length * 3 + after);
    const start = this.used + before;
    const end = start + this.buf.write(text, start, 'utf8');
    this.used = end + after;
    return { start, end };
  }

  /** The buffer the offsets returned by {@link append} refer to (valid until the next append). */
  get bytes(): Buffer {
    return this.buf;
  }

  /** Writes everything held to `fd` and empties the buffer. */
  writeTo(fd: number): void {
    let done = 0;
    while (done < this.used) done += writeSync(fd, this.buf, done, this.used - done);
    this.used = 0;
  }

  /** Forgets everything held. */
  clear(): void {
    this.used = 0;
  }

  private room(bytes: number): void {
    if (this.used + bytes <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.used + bytes) size *= 2;
    const bigger = Buffer.allocUnsafeSlow(size);
    this.buf.copy(bigger, 0, 0, this.used);
    this.buf = bigger;
  }
}
