/**
 * A stream's hold, following it: it starts at the input bound plus a first slice of output
 * (holds/plan.ts), shrinks as soon as the upstream reports its input, and grows in slices as output
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
 * upstreams generate 50 (test/support/upstreams.ts). What it generates before Till's next check
 * sees it: Till reads a stream only when its event loop gets to it, and a starved machine or a
 * garbage collection can make that read 100 to 200 ms late, while the upstream goes on writing into
 * the socket's buffers. So the hold is kept at min(ceiling, bound + margin), where the margin is
 * {@link CUT_MARGIN_TOKENS} (64, above the after-cut output) plus one check's worth: the largest
 * growth of the bound seen between two checks, or the generation speed bound times the event
 * loop's recent lateness (holds/loopLag.ts, never less than {@link LATE_FLOOR_MS}), whichever is
 * more. It is checked at every chunk and, for hidden output, every {@link TICK_MS}; it grows by
 * its plan's slice (holds/plan.ts: fewer ledger writes), or by what is left when less is. A growth
 * is on disk before the stream goes on (ledger.ts), so a crash counts the grown hold. Nothing of
 * Till's own may stall the thread long while followed streams are in flight (the tokenizer is
 * loaded before the first is forwarded, holds/plan.ts). If even the bound and the margin cannot be
 * covered, the stream is cut then: the upstream can bill at most what the hold covers. A cut
 * stream settles at what it produced (reported, or counted from its text) plus AFTER_CUT_TOKENS
 * (50, holds/plan.ts), marked estimated: the best estimate of the bill, where the margin is its bound.
 *
 * On a team ledger (ledger/postgres.ts) a growth answers after a round trip to the database, so
 * the hold grows ahead: a growth starts once what the stream needs comes within half a slice of
 * what it holds (or within what the stream produces in two of its last growth's round trips, when
 * the database is slow), and the stream goes on meanwhile. Should a stream outrun it anyway
 * (a burst), it goes on while the hold still covers what was seen (only the margin is thinner
 * until the growth lands), and is cut the moment it does not.
 * A growth refused while the stream already needs more than it holds is tried again at exactly
 * what it needs; refused again, the stream is cut, as on the local ledger. A growth refused ahead
 * of need is tried again a quarter slice later: other streams of the key end and leave room.
 *
 * Server-side tool calls (a web search) bill a fee and their results as input. A tool whose calls
 * the request limits is held for all of them from the start; one whose calls are not limited is
 * held for one call ahead of those the stream has started: a call starts upstream before Till
 * sees it, and the one held ahead covers it. Each call seen grows the hold by one more call; when
 * the key cannot cover it, the stream is ended before the model can start another.
 */
import { CUT_MARGIN_TOKENS, holdAmounts, type HoldPlan } from './plan';
import type { Denial } from '../denial';
import { growthRefusal, ledgerDenial, type Hold } from '../keys/keys';
import type { HoldRefusal } from '../ledger/ledger';
import type { Usage } from '../metering/usage';
import { costAt, ratesFor } from '../metering/pricing';
import { MICROS, type Amounts } from '../policy/policy';
import { recentLoopLagMs } from './loopLag';

/** How often a stream that may produce hidden output is re-checked between chunks. */
export const TICK_MS = 250;

/**
 * How late Till may read a stream's data even when its event loop kept time lately: a process
 * is descheduled, or collects garbage, without warning.
 */
export const LATE_FLOOR_MS = 100;

/** What follows a stream needs from the stream: what arrived so far. */
export interface StreamProgress {
  /** UTF-8 bytes of generated text (and tool arguments) seen so far. */
  readonly textBytes: number;
  /** Server-side tool calls started so far, by the name they start under (`web_search`). */
  readonly toolCalls: Readonly<Record<string, number>>;
  /** Usage the upstream has reported so far (partial while it streams), if any. */
  usage(): Usage | undefined;
}

/** The hold of one stream in flight, kept in step with it. */
export class StreamHold {
  /** Input held apart from server-side tool results: tokens, and their micro-dollars. */
  private input: number;
  private inputMicros: number;
  private outputRate: number;
  private held: number;
  /** Calls held per server-side tool (as in plan.tools). */
  private calls: number[];
  /** Fees held apart from tool calls (a request fee). */
  private readonly otherFees: number;
  private inputReported = false;
  private readonly started = performance.now();
  /** The output bound at the last check, and the most it has grown between two checks. */
  private lastBound = 0;
  private largestStep = 0;

  /** A team ledger's growth on its way (see the top of this file). */
  private growing = false;
  /** What the stream needed held at the last check (a team ledger's growth is answered later). */
  private needed = 0;
  /** After a growth ahead of need was refused: the output bound at which to try again. */
  private retryAheadAt = 0;
  /** How long the team ledger took to answer this stream's last growth. */
  private roundTripMs = 0;

  constructor(
    private readonly plan: HoldPlan,
    private readonly hold: Hold,
    /** The hold is on a team ledger: changes answer after a round trip. */
    private readonly shared = false,
  ) {
    this.calls = plan.tools.map((t) => t.held);
    const results = this.resultTokens(this.calls);
    this.input = plan.input.tokens - results;
    this.inputMicros = Math.max(0, plan.input.micros - Math.ceil(results * plan.inputRate));
    this.otherFees = plan.feesMicros - this.toolFees(this.calls);
    this.outputRate = plan.outputRate;
    this.held = plan.output.held;
  }

  /**
   * Brings the hold in step with `progress`. Returns undefined while the key covers the stream,
   * or the denial to cut it with when it cannot.
   */
  follow(progress: StreamProgress): Denial | undefined {
    if (this.lateDenial) return this.lateDenial;
    const usage = progress.usage();
    this.takeReportedInput(usage);
    const bound = this.outputBound(progress, usage);
    const needed = Math.min(this.plan.output.ceiling, bound + this.margin(bound));
    const calls = this.callsFor(progress.toolCalls, 1);
    const callsGrow = calls.some((n, i) => n > this.calls[i]!);
    if (this.shared) return this.followAhead(bound, needed, calls, callsGrow);
    if (needed <= this.held && !callsGrow) {
      if (this.inputShrank) this.resize(this.held, this.calls);
      return undefined;
    }
    const grown =
      needed <= this.held ? this.held : Math.min(this.plan.output.ceiling, Math.max(needed, this.held + this.plan.output.slice));
    if (!this.resize(grown, calls)) return undefined;
    const refused = this.resize(needed, calls);
    if (!refused) return undefined;
    // Nothing more can be held: cover the calls already started (their results and fees are
    // being billed), and end the stream.
    if (callsGrow) this.resize(needed, this.callsFor(progress.toolCalls, 0));
    return growthRefusal(
      refused,
      callsGrow
        ? 'the stream was ended: the key cannot cover another server-side tool call'
        : 'the stream was ended: the key cannot cover what it may produce next',
    );
  }

  /** {@link follow} on a team ledger: grows ahead, asynchronously; cuts once what is needed is refused. */
  private followAhead(bound: number, needed: number, calls: number[], callsGrow: boolean): Denial | undefined {
    this.needed = needed;
    const ceiling = this.plan.output.ceiling;
    // Outran its hold while a growth was on its way: what was seen is no longer covered. Cut now.
    // (The bound counts text bytes, which run ahead of tokens, but never past the ceiling, which the
    // upstream enforces: a hold at the ceiling covers the stream however many bytes it sends.)
    if (Math.min(bound, ceiling) > this.held) {
      return {
        status: 429,
        code: 'exhausted',
        message: 'the stream was ended: it produced more than its hold before the team ledger could grow it',
      };
    }
    if (this.growing) return undefined;
    // Ahead by half a slice, or by what the stream produces in two of the ledger's round trips, if more.
    const elapsed = performance.now() - this.started;
    const lead = elapsed > 0 ? Math.ceil((bound / elapsed) * 2 * this.roundTripMs) : 0;
    const near = needed + Math.max(Math.floor(this.plan.output.slice / 2), lead) > this.held && this.held < ceiling;
    // A growth refused ahead of need is tried again once the stream has come a quarter slice further.
    const due = needed > this.held || callsGrow || (near && bound >= this.retryAheadAt);
    if (!due) return undefined;
    // Once room was short, only what is needed is asked for: one round trip to the answer.
    const short = needed > this.held && this.retryAheadAt > 0;
    this.growTo(short ? needed : Math.min(ceiling, Math.max(needed, this.held + this.plan.output.slice)), calls);
    return undefined;
  }

  /**
   * Asks the team ledger for `output` tokens and `calls`. Refused: when the stream already needs
   * more than it holds, asked again for exactly that, and refused again the stream is ended, as on
   * the local ledger; refused ahead of need, it is only tried again later (other streams of the key
   * may have ended meanwhile and left room).
   */
  private growTo(output: number, calls: number[]): void {
    this.growing = true;
    const asked = performance.now();
    const answer = this.hold.resize(this.amountsFor(output, calls));
    void Promise.resolve(answer).then(
      (refused) => {
        this.growing = false;
        this.roundTripMs = performance.now() - asked;
        if (!refused) {
          this.held = Math.max(this.held, output);
          this.calls = calls;
          this.retryAheadAt = 0;
          return;
        }
        const callsGrow = calls.some((n, i) => n > this.calls[i]!);
        if (this.needed > this.held || callsGrow) {
          if (this.needed < output && this.needed > this.held) return this.growTo(this.needed, calls);
          this.lateDenial ??= growthRefusal(
            refused,
            callsGrow
              ? 'the stream was ended: the key cannot cover another server-side tool call'
              : 'the stream was ended: the key cannot cover what it may produce next',
          );
          return;
        }
        this.retryAheadAt = this.lastBound + Math.max(1, Math.floor(this.plan.output.slice / 4));
      },
      (err: unknown) => {
        this.growing = false;
        this.lateDenial ??= ledgerDenial(err, true);
      },
    );
  }

  /**
   * Calls to hold per tool: those started plus `ahead` for a tool whose calls the request does
   * not limit (a call starts before Till sees it, so one is always held ahead); the limit, else.
   */
  private callsFor(started: Readonly<Record<string, number>>, ahead: number): number[] {
    // Nearly every stream offers no server-side tool: nothing to follow, nothing to allocate.
    if (this.plan.tools.length === 0) return this.calls;
    return this.plan.tools.map((t, i) =>
      t.maxCalls !== undefined ? this.calls[i]! : Math.max(this.calls[i]!, (started[t.calls] ?? 0) + ahead),
    );
  }

  private resultTokens(calls: number[]): number {
    return this.plan.tools.reduce((sum, t, i) => sum + calls[i]! * t.resultTokens, 0);
  }

  private toolFees(calls: number[]): number {
    return this.plan.tools.reduce((sum, t, i) => sum + calls[i]! * t.feeMicros, 0);
  }

  private inputShrank = false;

  /** The upstream reported its input (Anthropic `message_start`, Gemini's first usage): hold that, at its real price. */
  private takeReportedInput(usage: Usage | undefined): void {
    if (this.inputReported || !usage || usage.inputTokens <= 0) return;
    this.inputReported = true;
    const price = this.plan.price;
    this.input = usage.inputTokens;
    if (price) {
      const exact = {
        inputTokens: usage.inputTokens,
        outputTokens: 0,
        cachedInputTokens: usage.cachedInputTokens,
        cacheWriteTokens: usage.cacheWriteTokens,
        cacheWrite1hTokens: usage.cacheWrite1hTokens,
        serviceTier: usage.serviceTier,
      };
      this.inputMicros = Math.ceil(costAt({ ...price, requestFee: 0 }, exact) * MICROS);
      this.outputRate = ratesFor(price, usage.inputTokens, usage.serviceTier).output;
    }
    this.inputShrank = this.input < this.plan.input.tokens;
  }

  /**
   * Output to hold beyond the bound: what the upstream generates after a cut, plus what it can
   * generate before the next check sees it: the largest step seen between two checks (an
   * upstream that sends in bursts), or its speed over the event loop's recent lateness
   * (holds/loopLag.ts), whichever is more.
   */
  private margin(bound: number): number {
    this.largestStep = Math.max(this.largestStep, bound - this.lastBound);
    this.lastBound = bound;
    const late = Math.ceil((Math.max(LATE_FLOOR_MS, recentLoopLagMs()) / 1000) * this.plan.limits.tokensPerSecond);
    return CUT_MARGIN_TOKENS + Math.max(this.largestStep, late);
  }

  private outputBound(progress: StreamProgress, usage: Usage | undefined): number {
    let bound = Math.max(progress.textBytes, usage?.outputTokens ?? 0);
    if (this.plan.hiddenOutput)
      bound = Math.max(bound, Math.ceil(((performance.now() - this.started) / 1000) * this.plan.limits.tokensPerSecond));
    return bound;
  }

  /** A team ledger's refusal of a change, which ends the stream at the next check. */
  private lateDenial: Denial | undefined;

  /** What the hold must be to cover `output` tokens and `calls`, at the stream's input and rates now. */
  private amountsFor(output: number, calls: number[]): Amounts {
    const results = this.resultTokens(calls);
    const pricing = { meters: this.plan.meters, outputRate: this.outputRate, feesMicros: this.otherFees + this.toolFees(calls) };
    return holdAmounts(pricing, this.input + results, this.inputMicros + Math.ceil(results * this.plan.inputRate), output);
  }

  /** Holds `output` tokens and `calls` from now on; the meter that is short when the key cannot cover it. */
  private resize(output: number, calls: number[]): HoldRefusal | undefined {
    const refused = this.hold.resize(this.amountsFor(output, calls));
    if (refused instanceof Promise) {
      // A team ledger: a shrink of its input (reported by the upstream). It cannot be refused.
      void refused.catch(() => undefined);
    } else if (refused) return refused;
    this.held = output;
    this.calls = calls;
    this.inputShrank = false;
    return undefined;
  }
}
