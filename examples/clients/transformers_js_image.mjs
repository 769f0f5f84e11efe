// transformers.js on an exported SmolVLM / Idefics3 or LLaVA folder (e.g. runs/demo/corrected).
// node transformers_js_image.mjs OUT IMAGE
import path from 'node:path';
import { env, AutoProcessor, AutoModelForImageTextToText, RawImage } from '@huggingface/transformers';

env.allowRemoteModels = false;
env.localModelPath = '';
const folder = path.resolve(process.argv[2]);
const processor = await AutoProcessor.from_pretrained(folder);
// onnx/vision_encoder.onnx, embed_tokens.onnx, decoder_model_merged.onnx
const model = await AutoModelForImageTextToText.from_pretrained(folder, { dtype: 'fp32' });
const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: 'What does the image say?' }] }];
const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(text, [await RawImage.read(path.resolve(process.argv[3]))]);
const out = await model.generate({ ...inputs, max_new_tokens: 64, do_sample: false });
const reply = out.slice(null, [inputs.input_ids.dims[1], null]);
console.log(processor.batch_decode(reply, { skip_special_tokens: true })[0]);
