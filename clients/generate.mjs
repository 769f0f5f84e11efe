// Greedy generation with transformers.js on an exported folder, as written.
// usage: node generate.mjs FOLDER PROMPT [IMAGE|-] [MAX_NEW_TOKENS]
// prints one JSON line: {"prompt_ids": [...], "generated_ids": [...], "text": "..."}
import path from 'node:path';
import {
    env, AutoConfig, AutoTokenizer, AutoProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, RawImage,
} from '@huggingface/transformers';

const [folderArg, prompt, imageArg = '-', maxArg = '32'] = process.argv.slice(2);
if (!folderArg || prompt === undefined) {
    console.error('usage: node generate.mjs FOLDER PROMPT [IMAGE|-] [MAX_NEW_TOKENS]');
    process.exit(2);
}
// Local folders only: never reach for the Hugging Face Hub.
env.allowRemoteModels = false;
env.localModelPath = '';
const folder = path.resolve(folderArg);
const options = { dtype: 'fp32', device: 'cpu', local_files_only: true };
const config = await AutoConfig.from_pretrained(folder, options);
const multimodal = config.vision_config !== undefined;
const image = imageArg === '-' ? null : await RawImage.read(path.resolve(imageArg));

// As transformers' chat templating does: special tokens (a BOS) are added unless the
// rendered template already starts with the BOS token.
function tokenize(tokenizer, text) {
    const bos = tokenizer.bos_token;
    return tokenizer(text, { add_special_tokens: !(bos && text.startsWith(bos)) });
}

let inputs, tokenizer, model;
if (multimodal) {
    const processor = await AutoProcessor.from_pretrained(folder, options);
    tokenizer = processor.tokenizer;
    model = await AutoModelForImageTextToText.from_pretrained(folder, options);
    const content = image ? [{ type: 'image' }, { type: 'text', text: prompt }] : [{ type: 'text', text: prompt }];
    const text = processor.apply_chat_template([{ role: 'user', content }], { add_generation_prompt: true });
    // The processor expands the image token; a text-only prompt goes to the tokenizer.
    // LLaVA's processor takes (images, text), Idefics3's (text, images).
    const call = config.model_type === 'llava' ? () => processor([image], text) : () => processor(text, [image]);
    inputs = image ? await call() : tokenize(tokenizer, text);
} else {
    tokenizer = await AutoTokenizer.from_pretrained(folder, options);
    model = await AutoModelForCausalLM.from_pretrained(folder, options);
    const text = tokenizer.apply_chat_template([{ role: 'user', content: prompt }], {
        tokenize: false, add_generation_prompt: true,
    });
    inputs = tokenize(tokenizer, text);
}
const out = await model.generate({ ...inputs, max_new_tokens: Number(maxArg), do_sample: false });
const all = Array.from(out.tolist()[0], Number);
const promptLength = inputs.input_ids.dims.at(-1);
const generated = all.slice(promptLength);
console.log(JSON.stringify({
    prompt_ids: all.slice(0, promptLength),
    generated_ids: generated,
    text: tokenizer.decode(generated, { skip_special_tokens: true }),
}));
