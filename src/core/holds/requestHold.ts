/**
 * Taking one request's hold: plan it (holds/plan.ts), take it with the activation (keys.ts), follow
 * it if it streams on a limited key (streamHold.ts), and announce the request. The one place the
 * HTTP path (exchange.ts) and every WebSocket dialect (ws/proxy.ts) do it, synchronously on the
 * local ledger, so that what is left of the key cannot move between the plan and the hold. A team
 * ledger answers after a round trip, and checks the hold against the key as its database has it.
 */
import { planHold, type HoldPlan, type HoldRequest } from './plan';
import type { ConversationSizes } from './contexts';
import { isDenial, type Denial } from '../denial';
import type { RequestInfo, TillEvent, TillEvents } from '../events';
import type { Hold, InFlight, TillKeys } from '../keys/keys';
import type { KeyRecord } from '../ledger/ledger';
import type { PriceTable } from '../metering/pricing';
import type { Maybe } from '../maybe';
import { StreamHold } from './streamHold';

/** What taking a hold needs of the broker. */
export interface HoldContext {
  keys: TillKeys;
  prices: PriceTable;
  conversations: ConversationSizes;
  events: TillEvents;
}

/** A request's hold, taken: its plan (billable requests), the hold, and what follows its stream. */
export interface TakenHold {
  plan: HoldPlan | undefined;
  hold: Hold;
  streamHold: StreamHold | undefined;
}

/**
 * Takes the hold of the request `info` on `key`: planned from `request` when it is billable
 * (undefined: a free request, which holds no activation), cut through `flight` on revocation.
 * `batch` lets its ledger write join the event-loop turn's others. Announces `request.started`,
 * with what it holds and what bounds its input on a limited key. The denial when the key cannot
 * cover it.
 */
export function takeRequestHold(
  c: HoldContext,
  key: KeyRecord,
  info: RequestInfo,
  request: HoldRequest | undefined,
  flight: InFlight,
  batch: boolean,
): Maybe<TakenHold | Denial> {
  let plan: HoldPlan | undefined;
  if (request) {
    // Set, not spread into a copy with a new closure: this runs for every billable request.
    request.knownContext = c.conversations.get;
    const planned = planHold(request, key.policy, c.keys.remaining(key), c.keys.heldFor(key), c.prices);
    if (isDenial(planned)) return planned;
    plan = planned;
  }
  const hold = c.keys.hold(key, plan?.amounts, flight, { batch, smallest: plan?.smallest });
  // No closure on the local ledger's path: this runs for every request.
  return hold instanceof Promise ? hold.then((taken) => started(c, info, plan, taken)) : started(c, info, plan, hold);
}

/** A hold taken: announces the request, and follows its stream on a limited key. */
function started(c: HoldContext, info: RequestInfo, plan: HoldPlan | undefined, hold: Hold | Denial): TakenHold | Denial {
  if (isDenial(hold)) return hold;
  const limited = plan !== undefined && (plan.meters.tokens || plan.meters.spend);
  // Built field by field: spreads allocate, and this runs for every request.
  const started: Extract<TillEvent, { type: 'request.started' }> = { type: 'request.started', at: Date.now(), request: info };
  if (limited) {
    started.held = plan.amounts;
    started.basis = plan.input.basis;
  }
  c.events.emit(started);
  return { plan, hold, streamHold: limited && plan.stream ? new StreamHold(plan, hold, c.keys.shared) : undefined };
}
