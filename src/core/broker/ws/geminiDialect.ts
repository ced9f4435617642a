/**
 * Gemini Live's WebSocket dialect (BidiGenerateContent): the `setup` names the model (checked
 * against the key's scope; on a budgeted key it is planned once, capping each turn's output to
 * what was left), each client turn that completes (`clientContent.turnComplete`) is a turn held
 * before it is forwarded, and the server's content, usage and `turnComplete` follow and settle it.
 */
import { planHold } from '../../holds/plan';
import { isDenial, outOfScope } from '../../denial';
import { asObj, asStr, type Json } from '../../json';
import { usageFromJson } from '../../metering/usage';
import { modelViolation } from '../../policy/policy';
import { parseMessage, type Dialect, type DialectSession } from './dialect';

export const GEMINI_DIALECT: Dialect = { fromClient, fromUpstream };

function fromClient(s: DialectSession, msg: Json, data: Buffer, binary: boolean): void {
  const { key, provider } = s;
  const setup = asObj(msg.setup);
  if (setup) {
    const named = asStr(setup.model);
    const model = named?.replace(/^models\//, '');
    const outside = outOfScope(modelViolation(key.policy.models, model, true));
    if (outside) return s.refuseMessage(outside, undefined, model);
    s.model = model;
    // Budgeted keys: each turn's output is capped to what was left when the session began.
    if (key.policy.maxTokens !== undefined || key.policy.maxSpendUsd !== undefined) {
      const planned = planHold(
        { provider: provider.id, model, format: 'gemini', json: setup, bodyBytes: data.length, stream: true },
        key.policy,
        s.options.keys.remaining(key),
        s.options.keys.heldFor(key),
        s.options.prices,
      );
      if (isDenial(planned)) return s.refuseMessage(planned, undefined, model);
      if (planned.bodyChanged) return s.send(0, JSON.stringify(msg), false);
    }
    return s.send(0, data, binary);
  }
  const content = asObj(msg.clientContent) ?? asObj(msg.client_content);
  if (content && (content.turnComplete === true || content.turn_complete === true)) {
    const turn = s.newTurn(s.model, true);
    const request = {
      provider: provider.id,
      model: s.model,
      format: 'gemini' as const,
      json: undefined,
      bodyBytes: data.length,
      stream: true,
      carriedContext: s.lastTotal,
    };
    return s.holdTurn(turn, request, (planned) => {
      if (isDenial(planned)) return s.refuseMessage(planned, undefined);
      s.send(0, data, binary, () => s.reached(turn));
    });
  }
  s.send(0, data, binary);
}

function fromUpstream(s: DialectSession, data: Buffer): void {
  const msg = parseMessage(data);
  if (!msg) return;
  const content = asObj(msg.serverContent);
  const producing =
    asObj(content?.modelTurn) !== undefined || msg.toolCall !== undefined || asObj(content?.outputTranscription) !== undefined;
  let turn = s.turns.find((t) => t.begun);
  if (producing && !turn) turn = s.begin(undefined, undefined);
  if (!turn) turn = s.turns[0];
  if (!turn) return;
  const usage = usageFromJson('gemini', msg);
  if (usage) turn.usage = usage;
  let text = asStr(asObj(content?.outputTranscription)?.text) ?? '';
  const parts = asObj(content?.modelTurn)?.parts;
  if (Array.isArray(parts)) for (const p of parts) text += asStr(asObj(p)?.text) ?? '';
  // Live reports usage as it goes: the hold follows that too (its input shrinks at once).
  if (text.length > 0 || usage) s.progress(turn, text, usage);
  if (s.isOpen && content?.turnComplete === true) s.finishTurn(turn, 200, turn.usage);
}
