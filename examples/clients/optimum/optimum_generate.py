"""optimum's ORTModelForCausalLM on an exported folder, as written (runs in the optimum venv).
argv: OUT PROMPT; prints JSON {prompt_ids, generated_ids, text, versions}."""
import json
import sys

import optimum.version
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

folder, prompt = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = ORTModelForCausalLM.from_pretrained(folder, subfolder="onnx", file_name="model.onnx")
text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
add_special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
inputs = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"prompt_ids": inputs["input_ids"][0].tolist(), "generated_ids": new,
                  "text": tokenizer.decode(new, skip_special_tokens=True),
                  "versions": {"transformers": transformers.__version__, "optimum": optimum.version.__version__}}))
