// A Vercel AI SDK program configured by environment variables only, as `till exec` starts it:
// `node ai-sdk.mjs <openai|anthropic|google> <text|stream>`. Prints one JSON line per outcome.
import { createGoogleGenerativeAI } from '@ai-sdk/google';
import { anthropic } from '@ai-sdk/anthropic';
import { openai } from '@ai-sdk/openai';
import { generateText, streamText } from 'ai';

const [provider, mode] = process.argv.slice(2);
// The Google provider reads its key from GOOGLE_GENERATIVE_AI_API_KEY but no base URL variable:
// the base URL goes in code (Till's README says so).
const google = createGoogleGenerativeAI({ baseURL: `${process.env.GOOGLE_GEMINI_BASE_URL}/v1beta` });
const model = {
  openai: () => openai('gpt-5-mini'),
  anthropic: () => anthropic('claude-sonnet-5'),
  google: () => google('gemini-2.5-flash'),
}[provider]();
const print = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

if (mode === 'text') {
  const r = await generateText({ model, prompt: 'Say hello.', maxRetries: 0 });
  print({ text: r.text, usage: { input: r.usage.inputTokens, output: r.usage.outputTokens } });
} else {
  const r = streamText({ model, prompt: 'Tell me everything.', maxRetries: 0, onError: () => {} });
  let deltas = 0;
  for await (const part of r.fullStream) {
    if (part.type === 'text-delta' && ++deltas === 3) print({ streaming: true });
    if (part.type === 'error')
      print({ error: { name: part.error?.name ?? typeof part.error, message: part.error?.message ?? String(part.error) } });
  }
  print({ ended: true, deltas });
}
