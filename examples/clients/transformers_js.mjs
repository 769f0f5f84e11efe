// transformers.js (npm i @huggingface/transformers) on an exported text LLM, as written.
// node transformers_js.mjs OUT          (OUT: a folder written by `regap-export export`)
import path from 'node:path';
import { env, AutoTokenizer, AutoModelForCausalLM } from '@huggingface/transformers';

env.allowRemoteModels = false;
env.localModelPath = '';
const folder = path.resolve(process.argv[2]);
const tokenizer = await AutoTokenizer.from_pretrained(folder);
const model = await AutoModelForCausalLM.from_pretrained(folder, { dtype: 'fp32' });  // onnx/model.onnx
const text = tokenizer.apply_chat_template([{ role: 'user', content: 'How do I bake bread?' }],
    { tokenize: false, add_generation_prompt: true });
const inputs = tokenizer(text, { add_special_tokens: false });
const out = await model.generate({ ...inputs, max_new_tokens: 64, do_sample: false });
const reply = out.slice(null, [inputs.input_ids.dims[1], null]);
console.log(tokenizer.batch_decode(reply, { skip_special_tokens: true })[0]);
