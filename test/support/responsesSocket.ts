/** A client of the OpenAI Responses API over WebSocket (as Codex uses it), for tests through the broker. */
import WebSocket from 'ws';
import { waitFor } from './wait';

export interface ResponsesSocket {
  ws: WebSocket;
  /** The type of every event received, in order. */
  types: string[];
  /** Sends one turn and waits until it completes. */
  turn(input: string, model?: string): Promise<void>;
}

/** Opens `url` (ws:// or wss://) with the till key; resolves once open. `ca` trusts a test certificate. */
export async function openResponsesSocket(url: string, key: string, ca?: Buffer): Promise<ResponsesSocket> {
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${key}` }, ...(ca ? { ca } : {}) });
  const types: string[] = [];
  ws.on('message', (data: Buffer) => types.push((JSON.parse(data.toString()) as { type: string }).type));
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return {
    ws,
    types,
    turn: async (input, model = 'gpt-4o-mini') => {
      const done = types.filter((t) => t === 'response.completed').length;
      ws.send(JSON.stringify({ type: 'response.create', model, input }));
      await waitFor('the turn to complete', async () => types.filter((t) => t === 'response.completed').length > done);
    },
  };
}
