/**
 * What the conversations an upstream stores for its clients weigh: an OpenAI Responses request
 * with `previous_response_id` (or `conversation`) is billed for the whole stored conversation as
 * input, which its body does not show. Each response that went through Till is remembered here
 * by its id (and its conversation's), as the tokens it reported (its input and output: what the
 * next turn carries), so a request continuing it is held for that; one continuing a conversation
 * Till never saw is held for the model's context window (holds/plan.ts).
 *
 * Kept in the data folder (`contexts.jsonl`, one `{"i": id, "t": tokens}` line each, the last
 * line of an id winning), so that holds stay tight after a restart. Losing it loses nothing a
 * limit depends on: an unknown conversation is held at the larger bound.
 */
import { closeSync, writeSync } from 'node:fs';
import { openPrivateAppend, readPrivateFile, writePrivateFile } from '../files/privateFolder';

/** Conversations remembered at most. Default of {@link ConversationSizes}. */
export const REMEMBERED_CONVERSATIONS = 20_000;

export class ConversationSizes {
  private readonly sizes = new Map<string, number>();
  private fd = -1;
  private lines = 0;

  /** Reads `file` (a damaged line is skipped: it only makes a hold larger). */
  constructor(
    private readonly file: string | undefined,
    private readonly capacity = REMEMBERED_CONVERSATIONS,
  ) {
    if (!file) return;
    const text = readPrivateFile(file) ?? '';
    for (const line of text.split('\n')) {
      if (!line) continue;
      this.lines++;
      try {
        const entry = JSON.parse(line) as { i?: unknown; t?: unknown };
        if (typeof entry.i === 'string' && typeof entry.t === 'number' && Number.isSafeInteger(entry.t) && entry.t >= 0)
          this.remember(entry.i, entry.t);
      } catch {
        // a line cut short by a crash
      }
    }
    if (this.lines > 2 * this.capacity) this.rewrite();
    this.fd = openPrivateAppend(file);
  }

  /** The tokens a stored conversation carries, when Till saw it. Bound: a request's plan is given it as is. */
  readonly get = (id: string): number | undefined => this.sizes.get(id);

  /** Remembers that `id` now carries `tokens`. */
  record(id: string, tokens: number): void {
    if (!Number.isSafeInteger(tokens) || tokens < 0 || this.sizes.get(id) === tokens) return;
    this.remember(id, tokens);
    if (this.fd < 0) return;
    writeSync(this.fd, `${JSON.stringify({ i: id, t: tokens })}\n`);
    if (++this.lines > 2 * this.capacity) this.rewrite();
  }

  private remember(id: string, tokens: number): void {
    this.sizes.delete(id);
    this.sizes.set(id, tokens);
    if (this.sizes.size > this.capacity) this.sizes.delete(this.sizes.keys().next().value!);
  }

  private rewrite(): void {
    if (!this.file) return;
    let text = '';
    for (const [i, t] of this.sizes) text += `${JSON.stringify({ i, t })}\n`;
    writePrivateFile(this.file, text, false);
    this.lines = this.sizes.size;
    if (this.fd >= 0) {
      closeSync(this.fd);
      this.fd = openPrivateAppend(this.file);
    }
  }

  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
