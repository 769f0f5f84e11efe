"""What `tune` costs against one `evaluate` of the same records, measured in one run.

    python benchmarks/tune_cost.py                                   # embedded:organism, the bundled train split
    python benchmarks/tune_cost.py --model DIR --data FILE --limit 60
    python benchmarks/tune_cost.py --keep runs/tune-organism        # keep tune's folder (its choice)

Both steps read the same records (the bundled set's train split, or ``--data``, text records
with their image twins, ``--limit`` per label) and run in this process one after the other:

- ``evaluate``: ``evaluate_folder`` on an export of the default directions fitted on those
  records (calibrate and export are not timed): greedy replies off and on for every record
  through ONNX Runtime, KL, and the geometry;
- ``tune``: ``tune_to_folder`` with its defaults (its own fit, the proxy search, the default's and
  the finalists' exports and replies), everything it does from the records to its folder.

Target: tune's wall time <= 3 x evaluate's. Wall time on a shared machine moves with the other
jobs, so the script also reports each step's CPU time (this process, ``resource.getrusage``:
user + system, ONNX Runtime's threads included) and the load average before and after each.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _common import emit  # noqa: E402

TARGET_RATIO = 3.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn):
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
                    "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}


def records_file(data: Path | None, limit: int | None, folder: Path) -> tuple[Path, int]:
    """The records both steps read, as one JSONL (text records; each step renders the twins)."""
    from regap_export.data import load_bundled, load_records

    records = load_bundled("train") if data is None else load_records(data)
    if limit is not None:
        records = ([r for r in records if r.label == "harmful"][:limit]
                   + [r for r in records if r.label == "harmless"][:limit])
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "instruction": r.instruction, "label": r.label,
                                        **({"category": r.category} if r.category else {})}) + "\n"
                            for r in records if r.image is None))
    return path, sum(r.image is None for r in records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:organism")
    ap.add_argument("--data", type=Path, help="a JSONL of text records (default: the bundled train split)")
    ap.add_argument("--limit", type=int, help="at most N records per label")
    ap.add_argument("--keep", type=Path, help="keep tune's output folder here")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()

    from regap_export.calibration.folder import calibrate_to_folder
    from regap_export.evaluation.evaluate import evaluate_folder
    from regap_export.evaluation.tune import tune_to_folder
    from regap_export.export.pipeline import export_to_folder

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tune-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, n_text = records_file(args.data, args.limit, work)
        calibrate_to_folder(args.model, work / "directions", data=data, force=True, show_progress=False, plot=False)
        export_to_folder(args.model, work / "directions", work / "export", force=True)
        evaluation, evaluate_cost = timed(lambda: evaluate_folder(work / "export", [data], plot=False,
                                                                  show_progress=False))
        out = args.keep or work / "tune"
        report, tune_cost = timed(lambda: tune_to_folder(args.model, out, [data], force=True, show_progress=False,
                                                         echo=lambda line: print(line, flush=True)))
    finally:
        shutil.rmtree(work / "export", ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    records = 2 * n_text  # text records and their image twins
    ratio_wall = tune_cost["wall_s"] / evaluate_cost["wall_s"]
    ratio_cpu = tune_cost["cpu_s"] / evaluate_cost["cpu_s"]
    candidates = sum(c.get("proxy") is not None for c in report["candidates"])
    confirmed = sum(bool(c.get("confirmed")) for c in report["candidates"])
    rows = [("evaluate", str(records), f"{evaluate_cost['wall_s']:.0f}", f"{evaluate_cost['cpu_s']:.0f}", "1.00", "1.00"),
            ("tune", str(records), f"{tune_cost['wall_s']:.0f}", f"{tune_cost['cpu_s']:.0f}",
             f"{ratio_wall:.2f}", f"{ratio_cpu:.2f}")]
    emit("tune cost", {"model": args.model, "records": records, "limit": args.limit,
                       "evaluate": evaluate_cost, "tune": tune_cost, "tune_stages_s": report["seconds"],
                       "candidates_scored": candidates, "candidates_confirmed": confirmed,
                       "ratio_wall": round(ratio_wall, 3), "ratio_cpu": round(ratio_cpu, 3),
                       "target_ratio": TARGET_RATIO, "meets_target": ratio_wall <= TARGET_RATIO,
                       "chosen": report["chosen"]["name"], "evaluate_seconds_field": evaluation["seconds"]},
         rows, ("step", "records", "wall s", "cpu s", "wall / evaluate", "cpu / evaluate"))


if __name__ == "__main__":
    main()
