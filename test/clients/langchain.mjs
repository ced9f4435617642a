// A LangChain program configured by environment variables only, as `till exec` starts it:
// `node langchain.mjs <openai|anthropic> <text|stream>`. Prints one JSON line per outcome.
import { ChatAnthropic } from '@langchain/anthropic';
import { ChatOpenAI } from '@langchain/openai';

const [provider, mode] = process.argv.slice(2);
const model =
  provider === 'openai'
    ? new ChatOpenAI({ model: 'gpt-5-mini', maxRetries: 0 })
    : new ChatAnthropic({ model: 'claude-sonnet-5', maxRetries: 0 });
const print = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

if (mode === 'text') {
  const r = await model.invoke('Say hello.');
  print({ text: r.content, usage: { input: r.usage_metadata?.input_tokens, output: r.usage_metadata?.output_tokens } });
} else {
  let chunks = 0;
  try {
    for await (const chunk of await model.stream('Tell me everything.')) {
      if (chunk.content && ++chunks === 3) print({ streaming: true });
    }
  } catch (err) {
    print({ error: { name: err?.constructor?.name ?? typeof err, message: err?.message ?? String(err) } });
  }
  print({ ended: true, chunks });
}
