/** A client of the OpenAI Responses API over WebSocket (as Codex uses it), for tests through the broker. */
import WebSocket from 'ws';
import { waitFor } from './wait';

type Event = Record<string, unknown> & { type: string };

export interface ResponsesSocket {
  ws: WebSocket;
  /** The type of every event received, in order. */
  types: string[];
  /** Sends a `response.create` with `body` and waits for its answer: `response.completed`, or an `error` event. */
  create(body: Record<string, unknown>): Promise<Event>;
  /** Sends one turn and waits until it completes. */
  turn(input: string, model?: string): Promise<void>;
}

/** Opens `url` (ws:// or wss://) with the till key; resolves once open. `ca` trusts a test certificate. */
export async function openResponsesSocket(url: string, key: string, ca?: Buffer): Promise<ResponsesSocket> {
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${key}` }, ...(ca ? { ca } : {}) });
  const events: Event[] = [];
  ws.on('message', (data: Buffer) => events.push(JSON.parse(data.toString()) as Event));
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const create = async (body: Record<string, unknown>): Promise<Event> => {
    const from = events.length;
    ws.send(JSON.stringify({ type: 'response.create', ...body }));
    const answer = () => events.slice(from).find((e) => e.type === 'response.completed' || e.type === 'error');
    await waitFor('the response to complete', async () => answer() !== undefined);
    return answer()!;
  };
  return {
    ws,
    get types() {
      return events.map((e) => e.type);
    },
    create,
    turn: async (input, model = 'gpt-4o-mini') => {
      const answer = await create({ model, input });
      if (answer.type === 'error') throw new Error(`the turn was refused: ${JSON.stringify(answer)}`);
    },
  };
}
