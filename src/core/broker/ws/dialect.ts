/**
 * A WebSocket dialect: how the requests and the usage of one kind of WebSocket API are found in
 * its messages (openAiDialect.ts: OpenAI Responses and Realtime; geminiDialect.ts: Gemini Live),
 * and what it may do with its session (session.ts) to follow them: start, hold, follow and finish
 * the turns it finds, send messages on, refuse one. The session keeps the connection, its checks
 * common to every dialect (JSON, keys given twice, the credential masked), and its end.
 */
import type { HoldPlan, HoldRequest } from '../../holds/plan';
import type { StreamHold } from '../../holds/streamHold';
import type { Denial } from '../../denial';
import type { RequestInfo } from '../../events';
import type { Hold } from '../../keys/keys';
import type { KeyRecord } from '../../ledger/ledger';
import type { GeneratedText } from '../../metering/streamMeter';
import type { Usage } from '../../metering/usage';
import type { Provider } from '../../providers/providers';
import type { SocketDialect } from '../../providers/wire';
import { asObj, type Json } from '../../json';
import type { ProxyOptions } from './options';

/** One request of a WebSocket: a response the model generates (or a prewarm, billed nothing). */
export interface Turn {
  /** Its model, and `billable`: false for a prewarm (`generate: false`), tracked only to match its events. */
  info: RequestInfo;
  started: number;
  hold?: Hold;
  plan?: HoldPlan;
  /** The hold following its output (budgeted keys). */
  streamHold?: StreamHold;
  /** What its plan was made from, for counting a cut turn's input. */
  request?: Pick<HoldRequest, 'model' | 'format' | 'json' | 'bodyBytes'>;
  reached: boolean;
  /** Started by the upstream and running before a team ledger answered for its hold (see Session.begin). */
  early?: true;
  /** Set once the upstream has started it (`response.created`, Gemini's first content). */
  begun: boolean;
  responseId?: string;
  /**
   * A prewarm's input, in tokens at most (with the conversation it continues): it bills nothing,
   * but a response continuing it is billed for it. Undefined: Till cannot bound it.
   */
  carries?: number;
  streamId?: string;
  /** The client event id (Realtime), which upstream errors name. */
  eventId?: string;
  generated: GeneratedText;
  usage?: Usage;
  /** When its last `request.progress` went out (performance clock). */
  lastProgress: { at: number };
}

/** What a dialect may do with its session. */
export interface DialectSession {
  readonly options: ProxyOptions;
  readonly key: KeyRecord;
  readonly provider: Provider;
  readonly path: string;
  readonly dialect: SocketDialect;
  /** The model the session uses now (a Realtime `session.update`, Gemini's `setup`). */
  model: string | undefined;
  /** Tokens of the last response: the conversation the next one carries (Realtime, Gemini). */
  readonly lastTotal: number;
  /** The connection is open (not connecting, not ended). */
  readonly isOpen: boolean;
  /** Its turns in flight, oldest first. */
  readonly turns: readonly Turn[];
  newTurn(model: string | undefined, billable: boolean, streamId?: string, eventId?: string): Turn;
  /** Tracks a turn that holds nothing (a prewarm), to match its events. */
  addTurn(turn: Turn): void;
  /** Plans and takes a turn's hold, and starts it; the refusal when the key cannot cover it. */
  /** Takes a turn's hold and calls `then` with its plan or denial: at once on the local ledger, after a round trip on a team's. */
  holdTurn(turn: Turn, request: HoldRequest, then: (planned: HoldPlan | Denial) => void): void;
  /** The upstream has the turn's request: it may bill it. */
  reached(turn: Turn): void;
  /** The upstream started a turn (`response.created`, Gemini's first content). */
  begin(responseId: string | undefined, streamId: string | undefined): Turn | undefined;
  turnFor(responseId: string | undefined, streamId: string | undefined, begunOnly?: boolean): Turn | undefined;
  /** What a turn produced since (its text, its usage so far): its hold follows. */
  progress(turn: Turn, text: string | undefined, usage?: Usage): void;
  finishTurn(turn: Turn, status: number, usage: Usage | undefined): void;
  /** Sends a message on: 0 to the upstream, 1 to the client; `sent` once it is written. */
  send(direction: 0 | 1, data: Buffer | string, binary: boolean, sent?: () => void): void;
  /** Refuses one client message with an error event in the dialect's shape (the session goes on), or ends the session where the dialect has none. */
  refuseMessage(denial: Denial, eventId: string | undefined, model?: string): void;
}

/** What a dialect reads. */
export interface Dialect {
  /** A client message: a JSON object whose keys are each given once. */
  fromClient(s: DialectSession, msg: Json, data: Buffer, binary: boolean): void;
  /** An upstream message, its credential already masked, before it is sent on. */
  fromUpstream(s: DialectSession, data: Buffer): void;
}

/** A message's JSON object; `null` when it is not JSON at all, undefined when it is JSON but not an object. */
export function parseMessage(data: Buffer | string): Json | null | undefined {
  try {
    return asObj(JSON.parse(typeof data === 'string' ? data : data.toString('utf8')));
  } catch {
    return null;
  }
}

/** The `type` of an upstream event without parsing it all: OpenAI puts it first. */
export function quickType(data: Buffer): string | undefined {
  const m = /^\s*\{\s*"type"\s*:\s*"([^"\\]{1,100})"/.exec(data.toString('latin1', 0, Math.min(data.length, 160)));
  return m?.[1];
}
