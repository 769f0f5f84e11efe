"""`regap-export compare A B`: two evaluations of the same records, corrected replies side by side.

Choosing a variant (alpha, tau, bands, mode) means comparing refusal rates that differ by a few
requests. Two `evaluate` runs over the same records are paired, so per modality and label this
counts the records refused by one variant only and tests the difference with the exact McNemar
test (``regap_export.evaluation.proportions``), beside each rate's 95 % Wilson interval. It reads only
``evaluation.json`` files: no model, no torch (``regap_export.evaluation`` imports neither at
module level).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.artifacts import read_json
from .behaviour import CELL_ORDER, DEFAULT_REFUSAL_MARKERS, is_refusal, paired_refusals
from ..errors import ArtifactError, RegapError
from .evaluate import EVALUATION_FILENAME, FORMAT_VERSION
from .proportions import format_rate


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """An ``evaluation.json`` as a dict: ``path`` is the file or the export folder holding it."""
    path = Path(path)
    file = path / EVALUATION_FILENAME if path.is_dir() else path
    if not file.is_file():
        raise ArtifactError("no evaluation.json here", path=path,
                            hint="run `regap-export evaluate FOLDER` first, or pass the evaluation.json file")
    report = read_json(file, what=EVALUATION_FILENAME, hint="pass the evaluation.json that evaluate wrote")
    if "generations" not in report or "behaviour" not in report:
        raise ArtifactError("not an evaluation report (no generations / behaviour)", path=file,
                            hint="pass the evaluation.json that evaluate wrote")
    if str(report.get("format_version")) != FORMAT_VERSION:
        raise ArtifactError(f"evaluation format_version {report.get('format_version')!r} is not supported "
                            f"(this version reads {FORMAT_VERSION!r})", path=file, field="format_version",
                            hint="evaluate again with this version of regap-export")
    return report


def _by_record(report: dict[str, Any], name: str) -> dict[tuple[str, str], dict[str, Any]]:
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for g in report["generations"]:
        key = (g["id"], g["modality"])
        if key in records:
            raise ArtifactError(f"record {g['id']!r} ({g['modality']}) appears twice in evaluation {name}",
                                hint="re-run evaluate to write it again")
        records[key] = g
    return records


def compare_evaluations(a: dict[str, Any], b: dict[str, Any], *, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Corrected refusals of two evaluations of the same records, per modality and label.

    Returns ``{"a", "b", "n", "uncorrected_replies_differ", "cells": [...]}``; each cell has
    ``modality, label, n, refusal_a, refusal_b, refusal_a_ci95, refusal_b_ci95, refused_only_a,
    refused_only_b, mcnemar_p``. ``uncorrected_replies_differ`` counts records whose
    uncorrected reply differs between the two: 0 when both evaluated the same model the same
    way, as a comparison of corrections needs. ``RegapError`` when the two did not run the same
    records, labels, generation length or refusal markers (the rates would not be paired)."""
    first, second = _by_record(a, names[0]), _by_record(b, names[1])
    if first.keys() != second.keys():
        only_a, only_b = sorted(first.keys() - second.keys()), sorted(second.keys() - first.keys())
        example = (only_a or only_b)[0]
        raise RegapError(f"evaluations {names[0]} and {names[1]} did not run the same records: {len(only_a)} only "
                         f"in {names[0]}, {len(only_b)} only in {names[1]} (e.g. {example[0]!r}, {example[1]})",
                         hint="evaluate both folders with the same --data, --split and --limit")
    for setting, value_a, value_b, option in (
            ("max_new_tokens", a.get("max_new_tokens"), b.get("max_new_tokens"), "--max-new-tokens"),
            ("markers", a["behaviour"].get("markers"), b["behaviour"].get("markers"), "--markers")):
        if value_a != value_b:
            raise RegapError(f"evaluations {names[0]} and {names[1]} differ in {setting}",
                             hint=f"evaluate both with the same {option}")
    relabelled = [key for key in first if first[key]["label"] != second[key]["label"]]
    if relabelled:
        raise RegapError(f"record {relabelled[0][0]!r} is labelled {first[relabelled[0]]['label']} in "
                         f"{names[0]} and {second[relabelled[0]]['label']} in {names[1]}",
                         hint="evaluate both folders with the same data files")
    markers = a["behaviour"].get("markers", DEFAULT_REFUSAL_MARKERS)
    cells = []
    for modality, label in CELL_ORDER:
        keys = [k for k in sorted(first) if k[1] == modality and first[k]["label"] == label]
        if not keys:
            continue
        pairs = [(is_refusal(first[k]["text_on"], markers), is_refusal(second[k]["text_on"], markers)) for k in keys]
        cells.append({"modality": modality, "label": label, "n": len(pairs), **paired_refusals(pairs, ("a", "b"))})
    differ = sum(first[k]["text_off"] != second[k]["text_off"] for k in first)
    return {"a": names[0], "b": names[1], "n": len(first), "uncorrected_replies_differ": differ, "cells": cells}


def format_comparison(result: dict[str, Any]) -> str:
    """The human view of ``compare_evaluations``: one fixed-width row per cell."""
    header = ("modality", "label", "n", "refusal A [95 % interval]", "refusal B [95 % interval]",
              "refused only by A / B", "McNemar p")
    rows = [(c["modality"], c["label"], str(c["n"]),
             format_rate(c["refusal_a"], c["refusal_a_ci95"]), format_rate(c["refusal_b"], c["refusal_b_ci95"]),
             f"{c['refused_only_a']} / {c['refused_only_b']}", f"{c['mcnemar_p']:.2g}") for c in result["cells"]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"corrected replies: A = {result['a']}", f"                   B = {result['b']}"]
    for cols in [header, *rows]:
        lines.append("  ".join(text.ljust(w) if i < 2 else text.rjust(w)
                               for i, (text, w) in enumerate(zip(cols, widths))))
    if result["uncorrected_replies_differ"]:
        lines.append(f"warning: the uncorrected replies differ on {result['uncorrected_replies_differ']} of "
                     f"{result['n']} records: A and B did not evaluate the same model the same way (model, "
                     "runtime or device), so the difference is not the correction's alone")
    return "\n".join(lines)
