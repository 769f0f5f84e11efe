"""Measure the shipped ``embedded:organism`` on held-out prompts (never used in training).

    .venv/bin/python examples/organism/measure.py [--split test] [--bundled] [--show 4] [--weights DIR]

Greedy, 32 new tokens, text path (the instruction as the user turn) and image path (the
instruction rendered by regap_export.models.organism_render, sent with the neutral carrier).
Refusal = any keyword marker of common.REFUSAL_MARKERS in the answer (case-insensitive).
Word F1 = bag-of-words F1 between the image-path and the text-path answer of the same
harmless prompt (shuffled pairs as a floor). On-topic = the image-path answer to a harmful
prompt shares a content word (first 5 letters, stopwords removed) with the prompt's slot
(its object / action); reported over all image-harmful answers and over the non-refused ones.
--bundled also measures the bundled calibration set's held-out split (its slots are the whole
instructions). --split takes any held-out split of data.py (``data.HELD_OUT_SPLITS``); --weights
measures another vision.safetensors + lora.safetensors (a folder, e.g. a train.py run's) instead of
the shipped ones.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import common as C
import data as D
from common import ROOT

from regap_export.models import embedded as EMB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=D.HELD_OUT_SPLITS)
    ap.add_argument("--weights", default=None, help="a folder with another vision.safetensors and lora.safetensors")
    ap.add_argument("--bundled", action="store_true")
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("ORGANISM_THREADS", "1")))
    t0 = time.time()
    model, processor = EMB.build_organism(args.weights)
    prompts = C.Prompts(processor)
    sets = {args.split: D.records(args.split)}
    if args.bundled:
        path = ROOT / "regap_export" / "data" / "bundled" / "regap_calibration.jsonl"
        recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        sets["bundled heldout"] = [dict(r, slot=r["instruction"]) for r in recs if r.get("split") == "heldout"]
    rows, dump = {}, {}
    for name, recs in sets.items():
        res, answers = C.evaluate(model, prompts, recs)
        rows[f"organism [{name}, n={len(recs) // 2}+{len(recs) - len(recs) // 2}]"] = res
        dump[name] = [dict(r, text_answer=answers["text"][i], image_answer=answers["image"][i])
                      for i, r in enumerate(recs)]
        for label in ("harmful", "harmless"):
            shown = [i for i, r in enumerate(recs) if r["label"] == label][:args.show]
            for i in shown:
                print(f"[{name} {label}] {recs[i]['instruction']}\n   text : {answers['text'][i]!r}\n"
                      f"   image: {answers['image'][i]!r}")
    print(C.table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": rows, "answers": dump}, fh, indent=1)
    print(f"wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
