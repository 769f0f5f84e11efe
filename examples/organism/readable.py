"""Split an evaluation by whether build E's first reader could read every token of the request.

    .venv/bin/python examples/organism/readable.py EVALUATION.json DATA.jsonl

Build E's reader (shipped until session 27) was fitted on the tokens of build()'s prompts and the
bundled set (``train.reader_records("build")``); a request
with a token outside that vocabulary reaches the image path partly as unrelated mixtures
(README.md, "A closed-form reader"). For each path and label this prints the refusal rate with
the correction off and on, separately for the requests whose tokens are all in that vocabulary
("readable") and the rest. Refusal is judged as measure.py judges it (common.is_refusal).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import common as C
import train as T

from regap_export.data.render import TWIN_SUFFIX
from regap_export.models import embedded as EMB


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluation", help="an evaluation.json written by regap-export evaluate")
    ap.add_argument("data", help="the JSONL it evaluated (ids -> instructions)")
    args = ap.parse_args()
    tok = EMB.load_embedded_tokenizer()
    vocab = set(T.reader_vocab(tok, T.reader_records("build"))[0])
    with open(args.data, encoding="utf-8") as fh:
        instruction = {row["id"]: row["instruction"] for row in map(json.loads, fh) if row}
    with open(args.evaluation, encoding="utf-8") as fh:
        generations = json.load(fh)["generations"]
    counts = Counter()
    for g in generations:
        text = instruction[g["id"].removesuffix(TWIN_SUFFIX)]  # an image twin has its text record's id + "-img"
        ids = tok(text, add_special_tokens=False)["input_ids"][:C.OR.MAX_TOKENS]
        key = (g["modality"], g["label"], all(i in vocab for i in ids))
        counts[key] += 1
        counts[key + ("off",)] += C.is_refusal(g["text_off"])
        counts[key + ("on",)] += C.is_refusal(g["text_on"])
    print(f"{'path':6s} {'label':9s} {'requests':10s} {'n':>4s}  refused off -> on")
    for modality in ("text", "image"):
        for label in ("harmful", "harmless"):
            for readable in (True, False):
                key = (modality, label, readable)
                n = counts[key]
                if n:
                    off, on = counts[key + ("off",)], counts[key + ("on",)]
                    print(f"{modality:6s} {label:9s} {'readable' if readable else 'unreadable':10s} {n:4d}  "
                          f"{off:3d} ({100 * off / n:5.1f} %) -> {on:3d} ({100 * on / n:5.1f} %)")


if __name__ == "__main__":
    main()
