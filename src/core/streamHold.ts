/**
 * A stream's hold, following it: it starts at the input bound plus a first slice of output
 * (budget.ts), shrinks as soon as the upstream reports its input, and grows in slices as output
 * arrives. When the key cannot cover what the stream may have produced, the stream is ended the
 * way revocation ends it (abort upstream, an error event to the client) and billed what it made.
 *
 * Why the bill never crosses the limit. At any moment the hold's output part must cover what
 * the upstream may bill for output if the stream were cut now: what it has generated, plus what
 * it generates before it notices the cut. Generated output is bounded by
 * - the bytes of generated text seen (a byte-level tokenizer never makes more tokens than bytes),
 * - for a model that may reason without streaming it (hidden output), its generation speed bound
 *   (`tokensPerSecond`, prices.json) times the time since the answer began,
 * - the request's cap (its ceiling), which the upstream enforces.
 * What it generates after a cut: providers notice a dropped connection at their next write after
 * the reset reaches them, about one round trip (under 100 ms) plus their write interval; at the
 * fastest frontier speeds (about 300–600 tokens a second) that is some 30 to 60 tokens; the test
 * upstreams generate 50 (test/support/upstreams.ts). The hold keeps a margin above that,
 * {@link CUT_MARGIN_TOKENS} (64), and is kept at min(ceiling, bound + margin), checked at every
 * chunk and, for hidden output, every {@link TICK_MS}; it grows by its plan's slice (budget.ts:
 * fewer ledger writes), or by what is left when less is. A growth is on disk before the stream goes on
 * (ledger.ts), so a crash counts the grown hold. If even the bound and the margin cannot be
 * covered, the stream is cut then: the upstream can bill at most what the hold covers. A cut
 * stream settles at what it produced (reported, or counted from its text) plus AFTER_CUT_TOKENS
 * (50, budget.ts), marked estimated: the best estimate of the bill, where the margin is its bound.
 */
import { CUT_MARGIN_TOKENS, holdAmounts, type HoldPlan } from './budget';
import type { Denial } from './denial';
import type { Hold } from './keys';
import type { Usage } from './metering';
import { costAt, ratesFor } from './pricing';

/** How often a stream that may produce hidden output is re-checked between chunks. */
export const TICK_MS = 250;

/** What follows a stream needs from the stream: what arrived so far. */
export interface StreamProgress {
  /** UTF-8 bytes of generated text (and tool arguments) seen so far. */
  readonly textBytes: number;
  /** Usage the upstream has reported so far (partial while it streams), if any. */
  usage(): Usage | undefined;
}

/** The hold of one stream in flight, kept in step with it. */
export class StreamHold {
  private input: number;
  private inputMicros: number;
  private outputRate: number;
  private held: number;
  private inputReported = false;
  private readonly started = performance.now();

  constructor(
    private readonly plan: HoldPlan,
    private readonly hold: Hold,
  ) {
    this.input = plan.input.tokens;
    this.inputMicros = plan.input.micros;
    this.outputRate = plan.outputRate;
    this.held = plan.output.held;
  }

  /** Output tokens held now. */
  get heldOutput(): number {
    return this.held;
  }

  /**
   * Brings the hold in step with `progress`. Returns undefined while the key covers the stream,
   * or the denial to cut it with when it cannot.
   */
  follow(progress: StreamProgress): Denial | undefined {
    const usage = progress.usage();
    this.takeReportedInput(usage);
    const bound = this.outputBound(progress, usage);
    const needed = Math.min(this.plan.output.ceiling, bound + CUT_MARGIN_TOKENS);
    if (needed <= this.held) {
      if (this.inputShrank) this.resize(this.held);
      return undefined;
    }
    const grown = Math.min(this.plan.output.ceiling, Math.max(needed, this.held + this.plan.output.slice));
    if (this.resize(grown) || this.resize(needed)) return undefined;
    return this.hold.refusal('the stream was ended: the key cannot cover what it may produce next');
  }

  private inputShrank = false;

  /** The upstream reported its input (Anthropic `message_start`, Gemini's first usage): hold that, at its real price. */
  private takeReportedInput(usage: Usage | undefined): void {
    if (this.inputReported || !usage || usage.inputTokens <= 0) return;
    this.inputReported = true;
    const price = this.plan.price;
    this.input = usage.inputTokens;
    if (price) {
      const exact = { inputTokens: usage.inputTokens, outputTokens: 0, cachedInputTokens: usage.cachedInputTokens, cacheWriteTokens: usage.cacheWriteTokens, cacheWrite1hTokens: usage.cacheWrite1hTokens, serviceTier: usage.serviceTier };
      this.inputMicros = Math.ceil(costAt({ ...price, requestFee: 0 }, exact) * 1_000_000);
      this.outputRate = ratesFor(price, usage.inputTokens, usage.serviceTier).output;
    }
    this.inputShrank = this.input < this.plan.input.tokens;
  }

  private outputBound(progress: StreamProgress, usage: Usage | undefined): number {
    let bound = Math.max(progress.textBytes, usage?.outputTokens ?? 0);
    if (this.plan.hiddenOutput) bound = Math.max(bound, Math.ceil(((performance.now() - this.started) / 1000) * this.plan.limits.tokensPerSecond));
    return bound;
  }

  private resize(output: number): boolean {
    const ok = this.hold.resize(holdAmounts({ ...this.plan, outputRate: this.outputRate }, this.input, this.inputMicros, output));
    if (ok) {
      this.held = output;
      this.inputShrank = false;
    }
    return ok;
  }
}
