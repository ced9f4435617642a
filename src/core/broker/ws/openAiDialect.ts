/**
 * OpenAI's WebSocket dialects: the Responses API over WebSocket (what Codex CLI tries first) and
 * Realtime. Each `response.create` is a turn, held before it is forwarded (a prewarm, `generate:
 * false`, passes and holds nothing); its events are followed by response or stream id, and its
 * final event (`response.completed`, `response.done`, …) settles it.
 */
import { inputTokensAtMost, type HoldRequest } from '../../holds/plan';
import { isDenial, outOfScope } from '../../denial';
import { asObj, asStr, type Json } from '../../json';
import { isTextDelta, RESPONSES_FINAL, serverToolCall } from '../../metering/streamMeter';
import { usageFromJson } from '../../metering/usage';
import { modelViolation, scopeViolation } from '../../policy/policy';
import { parseMessage, quickType, type Dialect, type DialectSession } from './dialect';

export const OPENAI_DIALECT: Dialect = {
  fromClient(s, msg, data, binary) {
    const type = msg.type;
    if (type === 'response.create') return createResponse(s, msg, data, binary);
    if (type === 'session.update' && s.dialect === 'realtime') {
      const model = asStr(asObj(msg.session)?.model);
      if (model !== undefined) {
        const outside = outOfScope(modelViolation(s.key.policy.models, model, true));
        if (outside) return s.refuseMessage(outside, asStr(msg.event_id));
        s.model = model;
      }
    }
    s.send(0, data, binary);
  },
  fromUpstream: meterOpenAi,
};

/** A `response.create`: a prewarm passes; anything that generates is admitted first. */
function createResponse(s: DialectSession, msg: Json, data: Buffer, binary: boolean): void {
  const { key, provider, path, dialect } = s;
  const prewarm = dialect === 'responses' && msg.generate === false;
  const model = dialect === 'responses' ? (asStr(msg.model) ?? s.model) : s.model;
  if (dialect === 'responses' && model !== undefined) s.model = model;
  const eventId = asStr(msg.event_id);
  const streamId = asStr(msg.stream_id);
  const outside = outOfScope(scopeViolation(key.policy, 'POST', path, model, !prewarm));
  if (outside) return s.refuseMessage(outside, eventId, model);
  // Realtime caps a response's output in `response.max_output_tokens`; the conversation it
  // continues is what the last response carried.
  const existing = dialect === 'realtime' ? asObj(msg.response) : msg;
  const target = existing ?? {};
  const request: HoldRequest = {
    provider: provider.id,
    model,
    format: 'openai-responses',
    json: target,
    bodyBytes: data.length,
    stream: true,
    ...(dialect === 'realtime' ? { carriedContext: s.lastTotal } : {}),
  };
  if (prewarm) {
    const turn = s.newTurn(model, false, streamId, eventId);
    // It bills nothing, but the response continuing it is billed for its input: counted (on a
    // limited key, where the hold depends on it), it is what that response carries.
    request.knownContext = s.options.conversations.get;
    const limited = key.policy.maxTokens !== undefined || key.policy.maxSpendUsd !== undefined;
    const carries = inputTokensAtMost(request, s.options.prices, limited);
    if (carries !== undefined) turn.carries = carries;
    s.addTurn(turn);
    return s.send(0, data, binary);
  }
  const turn = s.newTurn(model, true, streamId, eventId);
  s.holdTurn(turn, request, (planned) => {
    if (isDenial(planned)) return s.refuseMessage(planned, eventId, model);
    if (planned.bodyChanged && !existing) msg.response = target;
    s.send(0, planned.bodyChanged ? JSON.stringify(msg) : data, binary && !planned.bodyChanged, () => s.reached(turn));
  });
}

function meterOpenAi(s: DialectSession, data: Buffer): void {
  let type = quickType(data);
  let ev: Json | null | undefined;
  if (type === undefined) {
    ev = parseMessage(data);
    type = asStr(ev?.type);
    if (type === undefined) return;
  }
  const interesting =
    type === 'response.created' ||
    type === 'error' ||
    RESPONSES_FINAL.has(type) ||
    isTextDelta(type) ||
    type === 'response.output_item.added';
  if (!interesting) return;
  ev ??= parseMessage(data);
  if (!ev) return;
  const response = asObj(ev.response);
  const responseId = asStr(response?.id) ?? asStr(ev.response_id);
  const streamId = asStr(ev.stream_id);
  if (type === 'response.created') {
    s.begin(responseId, streamId);
  } else if (RESPONSES_FINAL.has(type)) {
    const turn = s.turnFor(responseId, streamId);
    if (turn) s.finishTurn(turn, 200, usageFromJson('openai-responses', ev));
  } else if (type === 'error') {
    // An error before a response began is that request's answer; later ones end with the response.
    const error = asObj(ev.error);
    const eventId = asStr(error?.event_id);
    const turn =
      s.dialect === 'realtime'
        ? s.turns.find((t) => !t.begun && t.eventId !== undefined && t.eventId === eventId)
        : s.turns.find((t) => !t.begun && (streamId === undefined || t.streamId === streamId));
    const status = typeof ev.status === 'number' ? ev.status : 400;
    if (turn) s.finishTurn(turn, status >= 400 ? status : 400, undefined);
  } else if (type === 'response.output_item.added') {
    // A server-side tool call (a web search) bills its fee and results: the hold follows it.
    const tool = serverToolCall('openai-responses', type, ev);
    const turn = tool === undefined ? undefined : s.turnFor(responseId, streamId, true);
    if (turn) {
      turn.generated.toolCall(tool);
      s.progress(turn, undefined);
    }
  } else {
    const delta = asStr(ev.delta);
    const turn = s.turnFor(responseId, streamId, true);
    if (turn && delta) s.progress(turn, delta);
  }
}
