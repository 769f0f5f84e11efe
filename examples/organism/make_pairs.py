"""Write a calibration JSONL whose image twins the organism can read (no tool change needed).

Every text record of the input (default: the bundled calibration set) is kept, with
``pair`` = its twin; the twin is an image record: the instruction rendered by
``regap_export.models.organism_render.render_instruction`` (a PNG, lossless, so the pixels
are exactly the renderer's), the neutral ``ORGANISM_CARRIER``, the same label / category /
split. Then, e.g.:

    .venv/bin/python examples/organism/make_pairs.py /tmp/organism_pairs
    regap-export calibrate embedded:organism --data /tmp/organism_pairs/pairs.jsonl --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from regap_export.models.organism_render import ORGANISM_CARRIER, render_instruction  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT / "regap_export" / "data" / "bundled" / "regap_calibration.jsonl")
    args = ap.parse_args()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for raw in args.data.read_text().splitlines():
        if not raw.strip():
            continue
        rec = json.loads(raw)
        if rec.get("image"):
            raise SystemExit(f"{rec['id']}: already has an image")
        twin = rec["id"] + "-img"
        render_instruction(rec["instruction"]).save(args.out / "images" / f"{twin}.png")
        lines.append(dict(rec, pair=twin))
        lines.append({k: v for k, v in dict(rec, id=twin, pair=rec["id"], image=f"images/{twin}.png",
                                            carrier=ORGANISM_CARRIER).items() if v is not None})
    (args.out / "pairs.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    print(f"wrote {len(lines)} records to {args.out / 'pairs.jsonl'}")


if __name__ == "__main__":
    main()
