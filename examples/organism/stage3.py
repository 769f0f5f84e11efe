"""Stage 3 (an experiment, not shipped): continue the shipped organism's LoRA on harmless
requests in the bundled set's free wording (broad.py), to lower the text path's over-refusal
on that wording without losing its refusals or the image path's gap.

Starts from the shipped files (vision.safetensors; lora.safetensors, unmerged, trained on);
one epoch of: text harmful -> refusal and text + image harmless -> the base model's answer
(seeded subsamples of the build's train split), plus broad.BROAD_HARMLESS as text -> the base
model's answer. Measures before and after on the organism's val split and broad.BROAD_VAL
(text path: those prompts use tokens the image reader was not fitted on), then, read once,
the test split and the bundled held-out split.

    .venv/bin/python examples/organism/stage3.py [--out /tmp/organism_s3] [--per-class 120] [--lr 3e-4]
        [--unlikelihood W] [--broad-harmful] [--lora-scale S]

--unlikelihood W adds W * -log(1 - p(" I can't" | prompt)) on every harmless text example: it
pushes the refusal's first three tokens down where the answer must not refuse (README.md,
"What remains", has what it did). --lora-scale S only measures the shipped LoRA with its
update scaled by S (a cheaper knob on the same trade-off).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import broad as B
import common as C
import data as D
import train as T

from regap_export.data import load_bundled
from regap_export.models import embedded as EMB


def load_shipped_unmerged():
    """(model, processor, loras): the organism with its LoRA as trainable factors."""
    model, processor = EMB.build_organism_untrained()
    EMB.load_organism_vision(model, EMB.ORGANISM_DIR / "vision.safetensors")
    loras = C.add_lora(model.model.text_model, 16, 32.0)
    with safe_open(str(EMB.ORGANISM_DIR / "lora.safetensors"), framework="pt") as fh:
        for name, module in loras.items():
            module.lora_A.data.copy_(fh.get_tensor(name + ".lora_A"))
            module.lora_B.data.copy_(fh.get_tensor(name + ".lora_B"))
    model.eval()
    return model, processor, loras


def bundled_heldout():
    """The bundled held-out split as common.evaluate's records (the slot is the whole request)."""
    return [dict(instruction=r.instruction, label=r.label, slot=r.instruction) for r in load_bundled("heldout")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/organism_s3")
    ap.add_argument("--per-class", type=int, default=120)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--unlikelihood", type=float, default=0.0,
                    help="weight of the refusal prefix's unlikelihood on harmless text examples")
    ap.add_argument("--broad-harmful", action="store_true",
                    help="also train broad.BROAD_HARMFUL as text -> the refusal")
    ap.add_argument("--lora-scale", type=float, default=None,
                    help="only measure the shipped LoRA with its update scaled by this factor (no training)")
    ap.add_argument("--held-out", action=argparse.BooleanOptionalAction, default=True,
                    help="also read the test split and the bundled held-out split (before and after)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ORGANISM_THREADS", "1")))
    T.set_seed(T.SEED)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = C.Clock()
    t0 = time.time()
    model, processor, loras = load_shipped_unmerged()
    prompts = C.Prompts(processor)
    recs = D.build(with_extra_harmful=True)
    train = [r for r in recs if r["split"] == "train"] + D.bundled_train()
    val = [r for r in recs if r["split"] == "val"]
    broad_val = [dict(instruction=t, label=label, slot=t) for t, label in B.BROAD_VAL]
    sets = {"val": (val, ("text", "image")), "broad val": (broad_val, ("text",))}
    if args.held_out:
        sets["test"] = ([r for r in recs if r["split"] == "test"], ("text", "image"))
        sets["bundled held-out"] = (bundled_heldout(), ("text", "image"))
    rng = random.Random(T.SEED + 3)
    harmful = rng.sample([r["instruction"] for r in train if r["label"] == "harmful"], args.per_class)
    harmless = rng.sample([r["instruction"] for r in train if r["label"] == "harmless"], args.per_class)
    results = {}

    def measure(stage):
        for name, (rows, paths) in sets.items():
            res, _ = C.evaluate(model, prompts, rows, paths=paths)
            results[f"{stage} [{name}]"] = res
            clock(f"{stage} [{name}]: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        (out / "results.json").write_text(json.dumps(results, indent=1))

    if args.lora_scale is not None:  # a measurement, no training
        for module in loras.values():
            module.scale = module.full_scale * args.lora_scale
        measure(f"2.2 shipped, LoRA x {args.lora_scale}")
        print(C.table(results))
        return
    measure("2.2 shipped")
    C.set_lora_enabled(loras, False)  # the base model's own answers are the harmless targets
    base = dict(zip(harmless + B.BROAD_HARMLESS, C.generate_ids(model, prompts, harmless + B.BROAD_HARMLESS, "text", 40)))
    C.set_lora_enabled(loras, True)
    clock(f"{len(base)} base answers")
    refusal_ids = prompts.tok(C.REFUSAL, add_special_tokens=False)["input_ids"] + [prompts.eos]
    examples = ([(t, "text", refusal_ids) for t in harmful]
                + [(t, "text", base[t]) for t in harmless if len(base[t]) > 1]
                + [(t, "image", base[t]) for t in harmless if len(base[t]) > 1]
                + [(t, "text", base[t]) for t in B.BROAD_HARMLESS if len(base[t]) > 1]
                + [(t, "text", refusal_ids) for t in (B.BROAD_HARMFUL if args.broad_harmful else [])])
    params = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt, batches = T.train_lora(model, prompts, examples, clock, "S3", lr=args.lr, params=params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(len(batches()) * args.epochs, 5))
    harmless_text = {i for i, (t, mode, _) in enumerate(examples) if mode == "text" and t in base}
    extra = T.refusal_unlikelihood(model, prompts, examples, harmless_text, refusal_ids[:3], args.unlikelihood)
    for epoch in range(args.epochs):
        T.run_epochs(model, prompts, examples, opt, sched, batches, clock, "S3", params, epoch, extra)
    save_file(C.lora_state(loras), str(out / "lora.safetensors"), metadata={"rank": "16", "alpha": "32"})
    measure("3 broad harmless")
    print(C.table({k: v for k, v in results.items()}))
    print(f"wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
