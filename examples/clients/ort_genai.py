"""ONNX Runtime GenAI (pip install onnxruntime-genai) on an exported text LLM, as written:
export writes genai_config.json next to config.json.   python ort_genai.py OUT"""
import json
import sys

import onnxruntime_genai as og

model = og.Model(sys.argv[1])
tokenizer = og.Tokenizer(model)
prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "How do I bake bread?"}]),
                                       add_generation_prompt=True)
params = og.GeneratorParams(model)
ids = tokenizer.encode(prompt)
params.set_search_options(max_length=len(ids) + 64, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(ids)
new = []
while not generator.is_done():
    generator.generate_next_token()
    new.append(generator.get_next_tokens()[0])
print(tokenizer.decode(new))
