// An OpenAI Agents SDK program configured by environment variables only, as `till exec` starts it:
// `node openai-agents.mjs <text|stream>`. Prints one JSON line per outcome. The SDK reads
// OPENAI_API_KEY and OPENAI_BASE_URL through the openai client, and OPENAI_AGENTS_DISABLE_TRACING
// (Till sets it) keeps it from posting traces to api.openai.com.
import { Agent, getGlobalTraceProvider, run } from '@openai/agents';

const [mode] = process.argv.slice(2);
const agent = new Agent({ name: 'till-test', instructions: 'Answer briefly.', model: 'gpt-5-mini' });
const print = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

if (mode === 'text') {
  const r = await run(agent, 'Say hello.');
  const u = r.state.usage;
  print({ text: r.finalOutput, usage: { input: u.inputTokens, output: u.outputTokens, requests: u.requests } });
  // Exports now what a longer-lived program would export later: traces, unless disabled.
  await getGlobalTraceProvider().forceFlush();
} else {
  let deltas = 0;
  try {
    const r = await run(agent, 'Tell me everything.', { stream: true });
    for await (const event of r) {
      if (event.type === 'raw_model_stream_event' && event.data.type === 'output_text_delta' && ++deltas === 3) print({ streaming: true });
    }
    await r.completed;
    if (r.error) throw r.error;
  } catch (err) {
    print({ error: { name: err?.constructor?.name ?? typeof err, message: err?.message ?? String(err) } });
  }
  print({ ended: true, deltas });
  // The SDK does not surface a stream's error event (it reports a missing final response), so
  // the next call shows what Till said: the key is revoked.
  try {
    await run(agent, 'Again.');
  } catch (err) {
    print({ next: { name: err?.constructor?.name ?? typeof err, message: err?.message ?? String(err) } });
  }
}
