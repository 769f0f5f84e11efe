"""Where should the correction act? Export one set of directions with each candidate and
evaluate each on the same held-out data (the aim: a correction that leaves text-only inputs
alone). Prints one row per variant: text-only replies left identical and their KL, image
replies changed, the image-text gap shrink at the read layer, and refusal off -> on.

    .venv/bin/python benchmarks/positions_variants.py runs/demo/directions [--model embedded:smolvlm]
        [--out runs/variants] [--limit N] [--refusal-directions DIR]

Variants: where the correction acts (``positions``) and what each corrected layer subtracts
(``layer_drift``). ``--refusal-directions`` adds the ShiftDC-style candidate: directions
calibrated with ``--drift-component refusal`` (only the drift's component along the refusal
direction), applied at every position. Results and the command go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "last+generated, increments (default)": {"positions": "last+generated", "layer_drift": "increment"},
    "last+generated, total d_l per layer": {"positions": "last+generated", "layer_drift": "total"},
    "image, increments": {"positions": "image", "layer_drift": "increment"},
    "all, total d_l per layer (METHOD's first reading)": {"positions": "all", "layer_drift": "total"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directions", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/variants"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--refusal-directions", type=Path, default=None)
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run only these variants (0-based)")
    args = parser.parse_args()

    from regap_export.evaluation import evaluate_folder
    from regap_export.export.pipeline import export_to_folder

    runs = [(name, args.directions, overrides) for name, overrides in VARIANTS.items()]
    if args.refusal_directions is not None:
        runs.append(("all, increments, drift component along rhat only", args.refusal_directions,
                     {"positions": "all", "layer_drift": "increment"}))
    if args.only is not None:
        runs = [run for i, run in enumerate(runs) if i in args.only]
    rows = []
    for name, directions, overrides in runs:
        folder = args.out / f"variant{len(rows)}"
        start = time.perf_counter()
        export_to_folder(args.model, directions, folder, formats=("onnx", "safetensors"), overrides=overrides,
                         force=True)
        report = evaluate_folder(folder, limit=args.limit, show_progress=False, plot=False)
        cells = {(c["modality"], c["label"]): c for c in report["behaviour"]["cells"]}
        text = [cells[("text", label)] for label in ("harmful", "harmless")]
        image = [cells[(("image", label))] for label in ("harmful", "harmless") if ("image", label) in cells]
        geometry = report["geometry"]["read_layer"]
        rows.append({
            "variant": name,
            "text_identical": sum(c["identical_share"] * c["n"] for c in text) / sum(c["n"] for c in text),
            "text_kl": max((c["mean_kl"] or 0.0) for c in text),
            "image_identical": (sum(c["identical_share"] * c["n"] for c in image) / sum(c["n"] for c in image))
            if image else None,
            "image_kl": max((c["mean_kl"] or 0.0) for c in image) if image else None,
            "gap_off": geometry["image_text_gap"]["off"], "gap_on": geometry["image_text_gap"]["on"],
            "gap_shrink": geometry.get("gap_shrink"),
            "refusal": {f"{c['modality']} {c['label']}": [c["refusal_off"], c["refusal_on"]]
                        for c in report["behaviour"]["cells"]},
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| variant | text replies identical | text KL (max cell) | image replies identical | image KL | "
          "gap at l_s off -> on (shrink) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        image = "-" if r["image_identical"] is None else f"{100 * r['image_identical']:.0f} %"
        image_kl = "-" if r["image_kl"] is None else f"{r['image_kl']:.3g}"
        shrink = "-" if r["gap_shrink"] is None else f"{100 * r['gap_shrink']:.0f} %"
        print(f"| {r['variant']} | {100 * r['text_identical']:.0f} % | {r['text_kl']:.3g} | {image} | {image_kl} | "
              f"{r['gap_off']:.3f} -> {r['gap_on']:.3f} ({shrink}) |")


if __name__ == "__main__":
    main()
