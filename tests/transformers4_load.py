"""Run under transformers 4.x by tests/test_transformers4.py (never imports regap_export).

argv: a JSON file holding a list of jobs {"folder", "auto_class", "inputs", "out"}. Each
folder is loaded as a new user would, ``<auto_class>.from_pretrained(folder,
trust_remote_code=True)`` in float32; the logits of ``inputs`` (a torch.save'd dict) go to
``out``. Writes ``<jobs file>.result.json``: per job the transformers version, the loaded
class, the config's rope_theta, and the error (type: message) when loading refused
(or the forward failed).
"""
import json
import sys

import torch
import transformers

jobs = json.loads(open(sys.argv[1]).read())
results = []
for job in jobs:
    entry = {"transformers": transformers.__version__, "folder": job["folder"]}
    try:
        model = getattr(transformers, job["auto_class"]).from_pretrained(
            job["folder"], trust_remote_code=True, torch_dtype=torch.float32).eval()
    except Exception as exc:  # the refusal is what some jobs check
        entry["error"] = f"{type(exc).__name__}: {exc}"
        results.append(entry)
        continue
    entry["class"] = type(model).__name__
    entry["rope_theta"] = getattr(model.config.get_text_config(), "rope_theta", None)
    entry["corrections"] = len(model.regap_corrections()) if hasattr(model, "regap_corrections") else None
    try:
        with torch.no_grad():
            logits = model(**torch.load(job["inputs"]), use_cache=False).logits
        torch.save(logits, job["out"])
    except Exception as exc:  # a model 4.x misreads may also fail to run
        entry["error"] = f"forward: {type(exc).__name__}: {exc}"
    results.append(entry)
with open(sys.argv[1] + ".result.json", "w") as f:
    json.dump(results, f, indent=1)
