"""The tool's greedy tokens (regap_export.runtime) for the same prompt, compared with optimum's.
argv: OUT PROMPT OPTIMUM_JSON; exit 1 when they differ."""
import json
import sys
from pathlib import Path

from transformers import AutoConfig

from regap_export.models import adapter_for_config
from regap_export.runtime import OrtSessions, generate

folder, prompt, optimum = Path(sys.argv[1]), sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
adapter = adapter_for_config(AutoConfig.from_pretrained(folder))
processor = adapter.load_processor(folder)
inputs = {k: v.numpy() for k, v in adapter.encode(processor, [adapter.render_prompt(processor, prompt, False)], None).items()}
result = generate(OrtSessions.open(folder / "onnx"), inputs["input_ids"], inputs["attention_mask"], max_new_tokens=64)
tool = result.new_tokens[0].tolist()[:len(optimum["generated_ids"])]
same = sum(a == b for a, b in zip(tool, optimum["generated_ids"]))
ok = inputs["input_ids"][0].tolist() == optimum["prompt_ids"] and tool == optimum["generated_ids"]
print(json.dumps({"optimum": optimum["versions"], "prompt_ids_equal": inputs["input_ids"][0].tolist() == optimum["prompt_ids"],
                  "tokens_equal": same, "tokens": len(optimum["generated_ids"]), "ok": ok}))
print("optimum:", optimum["text"][:200])
sys.exit(0 if ok else 1)
