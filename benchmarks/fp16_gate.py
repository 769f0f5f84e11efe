"""How much a float16 gate would move ReGap's gates, against what float16 hidden states move them anyway.

    python benchmarks/fp16_gate.py [--model embedded:organism] [--prompts 16]

The gated corrections of ``embedded:organism`` (its shipped directions, mode regap) read the
block output h of each adaptive layer: g = sigmoid(h . w + b). An fp16 graph holds h in float16.
Compared, on the image prompts of the bundled held-out split (their token-cell renderings, the
carrier text; every position of every prompt) and the text prompts:

- ``h16``: g from h rounded to float16, computed in float32 (what ``--precision fp16`` computes:
  the gate's projection blocked in float32) against g from the float32 h: the noise float16
  hidden states add to the gate whatever the gate's precision;
- ``gate16``: g computed in float16 arithmetic from the same float16 h (w, b rounded to float16;
  the projection accumulated in float32 and rounded, as float16 GEMV kernels do; bias add and
  sigmoid rounded) against the float32 gate of the float16 h: what a float16 gate adds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:organism")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()

    from regap_export.calibration.directions_io import load_directions
    from regap_export.data import load_bundled
    from regap_export.data.render import DEFAULT_CARRIER, declared_renderer
    from regap_export.method.folding import GATED, fold
    from regap_export.models.embedded import ORGANISM_DIR
    from regap_export.models.hooks import block_hidden
    from regap_export.models.loading import load_model

    loaded = load_model(args.model)
    adapter, processor, model = loaded.adapter, loaded.processor, loaded.model
    bundle = load_directions(Path(ORGANISM_DIR) / "directions.safetensors")
    options = dataclasses.replace(bundle.options, mode="regap").resolved(bundle.directions.num_layers)
    gated = {c.layer: c for c in fold(bundle.directions, options) if c.kind == GATED}
    records = [r for r in load_bundled("heldout")][: args.prompts]
    render = declared_renderer(loaded.folder) if (Path(loaded.folder) / "config.json").is_file() else None
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in gated}
    blocks = adapter.decoder_layers(model)

    def hook(layer):
        def fn(_m, _i, out):
            captured[layer].append(block_hidden(out).detach().reshape(-1, block_hidden(out).shape[-1]))
        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in gated]
    try:
        with torch.no_grad():
            for image in (False, True):
                for r in records:
                    text = adapter.render_prompt(processor, DEFAULT_CARRIER if image else r.instruction, with_image=image)
                    images = [render(r.instruction)] if image and render is not None else None
                    model(**adapter.encode(processor, [text], images), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    report = {}
    for layer, c in gated.items():
        h32 = torch.cat(captured[layer]).float()
        h16 = h32.half()
        w32, b32 = c.w.float(), float(c.b)
        g32 = torch.sigmoid(h32 @ w32 + b32)
        g_h16 = torch.sigmoid(h16.float() @ w32 + b32)
        z16 = (h16.float() @ w32.half().float()).half()
        z16 = (z16 + torch.tensor(b32).half()).half()
        g_gate16 = torch.sigmoid(z16.float()).half().float()
        report[layer] = {"positions": int(h32.shape[0]),
                         "h16_max": float((g_h16 - g32).abs().max()), "h16_p99": float((g_h16 - g32).abs().quantile(0.99)),
                         "gate16_max": float((g_gate16 - g_h16).abs().max()),
                         "gate16_p99": float((g_gate16 - g_h16).abs().quantile(0.99)),
                         "z_abs_max": float((h32 @ w32 + b32).abs().max())}
        print(layer, json.dumps(report[layer]), flush=True)
    print(json.dumps({"benchmark": "fp16_gate", "model": args.model, "prompts": args.prompts, "layers": report}))


if __name__ == "__main__":
    main()
