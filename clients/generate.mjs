// Greedy generation with transformers.js on an exported folder, as written.
// usage: node generate.mjs FOLDER PROMPT [IMAGE|-] [MAX_NEW_TOKENS] [DTYPE] [FOLLOW_UP_IDS]
//   DTYPE: transformers.js's dtype (fp32, fp16, q4f16, q8, q4): which graph files it loads.
//   FOLLOW_UP_IDS: a JSON list of token ids; the chat then continues with the cache: the reply is
//   followed by these tokens in one more generate() call given the first call's past_key_values.
// prints one JSON line: {"prompt_ids": [...], "generated_ids": [...], "text": "...",
//                        "follow_up_generated_ids": [...] (with FOLLOW_UP_IDS)}
import path from 'node:path';
import {
    env, AutoConfig, AutoTokenizer, AutoProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, RawImage, Tensor,
} from '@huggingface/transformers';

const [folderArg, prompt, imageArg = '-', maxArg = '32', dtype = 'fp32', followArg] = process.argv.slice(2);
if (!folderArg || prompt === undefined) {
    console.error('usage: node generate.mjs FOLDER PROMPT [IMAGE|-] [MAX_NEW_TOKENS] [DTYPE] [FOLLOW_UP_IDS]');
    process.exit(2);
}
// Local folders only: never reach for the Hugging Face Hub.
env.allowRemoteModels = false;
env.localModelPath = '';
const folder = path.resolve(folderArg);
const options = { dtype, device: 'cpu', local_files_only: true };
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
const first = await model.generate({
    ...inputs, max_new_tokens: Number(maxArg), do_sample: false, return_dict_in_generate: true,
});
const all = Array.from(first.sequences.tolist()[0], Number);
const promptLength = inputs.input_ids.dims.at(-1);
const generated = all.slice(promptLength);
const result = {
    prompt_ids: all.slice(0, promptLength),
    generated_ids: generated,
    text: tokenizer.decode(generated, { skip_special_tokens: true }),
};
if (followArg !== undefined) {
    // The whole conversation so far, as transformers' multi-turn generation takes it: generate()
    // feeds only the tokens the cache does not hold (the reply's last token and the new turn).
    const ids = [...all, ...JSON.parse(followArg).map(Number)];
    const input_ids = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
    const attention_mask = new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
    const second = await model.generate({
        input_ids, attention_mask, past_key_values: first.past_key_values, max_new_tokens: Number(maxArg),
        do_sample: false,
    });
    result.follow_up_generated_ids = Array.from(second.tolist()[0], Number).slice(ids.length);
}
console.log(JSON.stringify(result));
