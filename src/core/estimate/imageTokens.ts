/**
 * At most how many input tokens an image costs, per provider, from its size when the request
 * carries it inline, else the most any image can cost there (an image by URL or file id is
 * sized by the provider after it fetches it). Published rules, applied as upper bounds:
 * - OpenAI, tile models (GPT-4o, GPT-4.1, GPT-5 and later): fit within 2048×2048, then the short
 *   side to 768; 85 + 170 per 512-pixel tile (`detail: low`: 85). GPT-4o mini bills the same
 *   image at 2,833 + 5,667 per tile. Patch models (GPT-4.1 mini and nano, GPT-5 mini and nano,
 *   o4-mini): 32-pixel patches, at most 1,536, times the model's multiplier.
 * - Anthropic: width × height / 750, at most 4,800 (images above the model's limit are scaled
 *   down first; 4,800 covers the largest high-resolution limit).
 * - Gemini: 258 per 768-pixel tile of the image fitted within 3072×3072 (at most 16 tiles), or up
 *   to 1,120 at the highest media resolution.
 * - Others (Mistral's Pixtral and OpenAI-compatible hosts): one token per 16×16 pixels, at most 16,384.
 */
import { base64ImageSize, type ImageSize } from './imageSize';
import type { ImagePart } from './requestFacts';

const TILE = { base: 85, tile: 170 };
const TILE_4O_MINI = { base: 2833, tile: 5667 };
/** Patch models and their multipliers. */
const PATCH_MODELS: [RegExp, number][] = [
  [/^(openai\/)?gpt-(4\.1|5)-nano/, 2.46],
  [/^(openai\/)?gpt-(4\.1|5)-mini/, 1.62],
  [/^(openai\/)?o4-mini/, 1.72],
];
const ANTHROPIC_MAX = 4800;
const GEMINI_MAX = 1120;
const GENERIC_MAX = 16384;

function tiles(size: ImageSize): number {
  let { width: w, height: h } = size;
  const fit = Math.min(1, 2048 / Math.max(w, h));
  w *= fit;
  h *= fit;
  const short = Math.min(w, h);
  if (short > 768) {
    w *= 768 / short;
    h *= 768 / short;
  }
  return Math.ceil(w / 512) * Math.ceil(h / 512);
}

function geminiTiles(size: ImageSize): number {
  const fit = Math.min(1, 3072 / Math.max(size.width, size.height));
  return Math.ceil((size.width * fit) / 768) * Math.ceil((size.height * fit) / 768);
}

function patches(size: ImageSize): number {
  const n = Math.ceil(size.width / 32) * Math.ceil(size.height / 32);
  return Math.min(1536, n);
}

function openAiTokens(model: string, size: ImageSize | undefined, detail: string | undefined): number {
  const m = model.toLowerCase();
  const patch = PATCH_MODELS.find(([re]) => re.test(m));
  if (patch) return Math.ceil((size ? patches(size) : 1536) * patch[1]);
  const rule = /^(openai\/)?gpt-4o-mini/.test(m) ? TILE_4O_MINI : TILE;
  if (detail === 'low') return rule.base;
  // The most tiles an image can have: 768 × 2048 after scaling, 2 × 4.
  return rule.base + rule.tile * (size ? tiles(size) : 8);
}

/** At most how many input tokens `image` costs a request to `provider`'s `model`. */
export function imageTokens(provider: string, model: string | undefined, image: ImagePart): number {
  const size = image.base64 === undefined ? undefined : base64ImageSize(image.base64);
  switch (provider) {
    case 'openai':
    case 'azure-openai':
      return openAiTokens(model ?? '', size, image.detail);
    case 'anthropic':
      return size ? Math.min(ANTHROPIC_MAX, Math.ceil((size.width * size.height) / 750)) : ANTHROPIC_MAX;
    case 'gemini':
      return Math.max(GEMINI_MAX, 258 * (size ? geminiTiles(size) : 16));
    default:
      return size ? Math.min(GENERIC_MAX, Math.ceil(size.width / 16) * Math.ceil(size.height / 16)) : GENERIC_MAX;
  }
}

/** At most how many input tokens any image costs there, whatever its size (no header read). */
export function maxImageTokens(provider: string, model: string | undefined): number {
  return imageTokens(provider, model, {});
}
