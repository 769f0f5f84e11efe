"""The commands that have no other home (calibrate to a folder, inspect, demo), files at the edges.

The public API is the package's top level (``regap_export/__init__.py``); the CLI calls it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_output_dir, check_output_dir
from .checks import check_tensors_finite
from .calibration import CalibrationResult, calibrate, heldout_report
from .directions_io import FILENAME as DIRECTIONS_FILENAME
from .directions_io import load_directions, save_directions
from .errors import ArtifactError, RegapError
from .models.loading import load_model
from .options import RegapOptions
from .report import REPORT_FILENAME, format_band, json_safe, write_plot, write_report
from .stats import ActivationStats

STATS_FILENAME = "stats.safetensors"


def load_calibration_records(data: Path | None, *, label: str | None, split: str | None, render: bool,
                             multimodal: bool, renderer=None) -> list:
    from .data import load_bundled, load_records, split_records, to_multimodal_pairs

    if data is None:
        records = load_bundled(split or "train")
    else:
        records = split_records(load_records(data, label=label), split)
    if render and multimodal:
        records = to_multimodal_pairs(records, renderer=renderer)
    return records


def calibrate_to_folder(model: str | None, out_dir: Path, *, data: Path | None = None, label: str | None = None,
                        split: str | None = None, render: bool = True, options: RegapOptions = RegapOptions(),
                        batch_size: int = 8, dtype: str = "fp32", measure_after: bool = True,
                        save_stats: bool = False, merge_stats: Sequence[Path] = (), plot: bool = True,
                        force: bool = False, show_progress: bool = True, gate_read: str = "refusal"
                        ) -> CalibrationResult:
    """calibrate MODEL --data FILE --out DIR: directions.safetensors, report.json (+ plot, stats)."""
    out_dir = Path(out_dir)
    inputs = [data, model, *merge_stats]
    check_output_dir(out_dir, force=force, inputs=inputs)
    loaded = load_model(model, dtype=dtype)
    from .data.render import declared_renderer

    renderer = declared_renderer(loaded.folder)
    records = load_calibration_records(data, label=label, split=split, render=render,
                                       multimodal=loaded.adapter.multimodal, renderer=renderer)
    stats = merged_stats(merge_stats, loaded.fingerprint) if merge_stats else None
    result = calibrate(loaded, records, options, batch_size=batch_size, stats=stats,
                       measure_after=measure_after, show_progress=show_progress, gate_read=gate_read)
    if data is None and (split or "train") == "train":
        heldout = load_calibration_records(None, label=None, split="heldout", render=render,
                                           multimodal=loaded.adapter.multimodal, renderer=renderer)
        result.report["heldout"] = heldout_report(loaded, result.bundle, heldout, batch_size=batch_size,
                                                  show_progress=show_progress)
        best = result.report["best_layer"]
        result.report["heldout"]["auroc_T_at_best_layer"] = result.report["heldout"]["layers"][best]["auroc_T"]
    check_tensors_finite(result.bundle.directions.tensors(), path=data, what="the fitted directions'",
                         hint="the calibration data or options give a degenerate fit; nothing was written")
    with atomic_output_dir(out_dir, force=force, inputs=[*inputs, loaded.folder]) as tmp:
        save_directions(tmp, result.bundle)
        write_report(tmp, result.report)
        if plot:
            write_plot(tmp, result.report)
        if save_stats:
            result.stats.save(tmp / STATS_FILENAME, model_fingerprint=loaded.fingerprint)
    return result


def merged_stats(paths: Sequence[Path], fingerprint: str) -> ActivationStats:
    merged: ActivationStats | None = None
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILENAME
        if not path.is_file():
            raise ArtifactError("no statistics file here", path=path, hint="calibrate the shard with --save-stats")
        stats, source_fingerprint = ActivationStats.load(path)
        if source_fingerprint != fingerprint:
            raise ArtifactError(f"statistics come from another model (fingerprint {source_fingerprint}, "
                                f"this model {fingerprint})", path=path)
        merged = stats if merged is None else merged.merge(stats)
    assert merged is not None  # the caller passes at least one path
    return merged


def describe(path: Path) -> dict[str, Any]:
    """What a directions folder holds, as plain data."""
    path = Path(path)
    if not path.exists():
        raise RegapError("no such file or folder", path=path)
    if (path / DIRECTIONS_FILENAME).is_file() or path.name == DIRECTIONS_FILENAME:
        bundle = load_directions(path)
        folder = path if path.is_dir() else path.parent
        info: dict[str, Any] = {
            "kind": "directions",
            "path": str(folder),
            "model_source": bundle.model_source,
            "model_fingerprint": bundle.model_fingerprint,
            "calibration_sha256": bundle.calibration_sha256,
            "options": json.loads(bundle.options.to_json()),
            "gate_read": "refusal" if bundle.directions.gate_read is None else "discriminant",
            "tensors": {name: list(t.shape) for name, t in bundle.directions.tensors().items()},
            "per_layer": [
                {"layer": l,
                 "drift_norm": float(bundle.directions.drift[l].norm()),
                 "anchor_text": [float(bundle.directions.anchor_text_harmless[l]), float(bundle.directions.anchor_text_harmful[l])],
                 "anchor_probe": [float(bundle.directions.anchor_probe_harmless[l]), float(bundle.directions.anchor_probe_harmful[l])],
                 "kappa": float(bundle.directions.kappa[l])}
                for l in range(bundle.directions.num_layers)
            ],
        }
        report = folder / REPORT_FILENAME
        if report.is_file():
            data = json.loads(report.read_text())
            info["best_layer"] = data.get("best_layer")
            info["best_auroc_T"] = data.get("best_auroc_T")
        return json_safe(info)
    from .artifacts import MANIFEST_FILENAME, read_manifest

    if (path / MANIFEST_FILENAME).is_file():
        manifest = read_manifest(path)
        parity = manifest.get("parity")
        return json_safe({
            "kind": "exported", "path": str(path), "model": manifest["model"], "mode": manifest["mode"],
            "dtype": manifest["dtype"], "formats": manifest["formats"],
            "options": json.loads(manifest["options"]), "calibration_sha256": manifest["calibration_sha256"],
            "files": {rel: entry["bytes"] for rel, entry in manifest["files"].items()},
            "parity_ok": None if parity is None else parity["ok"],
        })
    raise ArtifactError("neither a directions folder (directions.safetensors) nor an exported folder "
                        "(regap_manifest.json)", path=path)


def describe_lines(info: dict[str, Any]) -> list[str]:
    if info["kind"] == "exported":
        parity = {None: "not validated yet", True: "passed", False: "FAILED"}[info["parity_ok"]]
        lines = [f"exported {info['path']}",
                 f"  model {info['model']['source']} ({info['model']['family']}, fingerprint {info['model']['fingerprint']})",
                 f"  mode {info['mode']}, dtype {info['dtype']}, formats {', '.join(info['formats'])}, parity {parity}",
                 "  options " + ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items()))]
        lines += [f"  {size:>12,d}  {rel}" for rel, size in info["files"].items()]
        return lines
    lines = [f"{info['kind']} {info['path']}",
             f"  model {info['model_source']} (fingerprint {info['model_fingerprint']})",
             f"  calibration set sha256 {info['calibration_sha256']}",
             "  options " + ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items())),
             f"  gate reads {'rhat' if info['gate_read'] == 'refusal' else 'gate_read (a discriminant)'}",
             "  tensors " + ", ".join(f"{k} {v}" for k, v in info["tensors"].items())]
    if info.get("best_layer") is not None:
        lines.append(f"  best layer {info['best_layer']} (text AUROC {info['best_auroc_T']:.3f})")
    lines.append("  layer  |drift|   a-        a+        c-        c+        kappa")
    for row in info["per_layer"]:
        lines.append(f"  {row['layer']:5d}  {row['drift_norm']:7.3f}  {row['anchor_text'][0]:8.3f}  {row['anchor_text'][1]:8.3f}  "
                     f"{row['anchor_probe'][0]:8.3f}  {row['anchor_probe'][1]:8.3f}  {row['kappa']:7.3f}")
    return lines


def demo(model: str, out_dir: Path, *, per_label: int = 24, echo=print) -> dict[str, Any]:
    """calibrate -> export -> validate -> evaluate -> generate on one model, each step reported."""
    import time

    from .data import load_bundled
    from .evaluation import evaluate_folder, table_lines
    from .export.pipeline import export_to_folder
    from .validation import validate_folder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = load_bundled("train")
    subset = [r for r in train if r.label == "harmful"][:per_label] + [r for r in train if r.label == "harmless"][:per_label]
    data = out_dir / "calibration.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "instruction": r.instruction, "label": r.label,
                                        "category": r.category}) + "\n" for r in subset))
    summary: dict[str, Any] = {}
    start = time.perf_counter()
    echo(f"[1/5] calibrate {model} on {len(subset)} bundled prompts (+ image twins) -> {out_dir / 'directions'}")
    result = calibrate_to_folder(model, out_dir / "directions", data=data, force=True, show_progress=True)
    report = result.report
    echo(f"      best layer {report['best_layer']}, text AUROC {report['best_auroc_T']:.3f}; "
         f"mode {report['options']['mode']}, probe band {format_band(report['options']['probe_band'])}, "
         f"adaptive band {format_band(report['options']['adaptive_band'])}, positions {report['options']['positions']}")
    summary["calibrate"] = {"best_layer": report["best_layer"], "auroc_T": report["best_auroc_T"]}
    corrected_dir = out_dir / "corrected"
    echo(f"[2/5] export -> {corrected_dir} (safetensors + ONNX, fp32)")
    export_to_folder(model, out_dir / "directions", corrected_dir, force=True)
    echo("[3/5] validate: reference hooks vs rewritten PyTorch vs ONNX Runtime (CPU)")
    parity = validate_folder(corrected_dir)
    for check in parity["checks"]:
        echo(f"      {check['target']:<16} {check['inputs']:<5} {check['quantity']:<28} "
             f"max|diff| {check['max_abs_diff']:.3g}  {'ok' if check['ok'] else 'FAILED'}")
    summary["validate"] = parity["ok"]
    if not parity["ok"]:
        raise RegapError("parity failed; see " + str(corrected_dir / "parity.json"))
    echo("[4/5] evaluate on the bundled held-out split: correction off vs on (ONNX Runtime)")
    evaluation = evaluate_folder(corrected_dir, show_progress=True)
    for line in table_lines(evaluation):
        echo("      " + line.replace("\n", "\n      "))
    summary["evaluate"] = {"cells": evaluation["behaviour"]["cells"],
                           "geometry": evaluation["geometry"]["read_layer"]}
    echo("[5/5] generate with ONNX Runtime, correction off vs on")
    replies = _demo_replies(corrected_dir, evaluation, images=bool(result.report["counts"].get("M+")), echo=echo)
    summary["generate"] = replies
    echo(f"done in {time.perf_counter() - start:.0f} s; parity PASSED; "
         f"text reply {'unchanged' if replies['text_on'] == replies['text_off'] else 'CHANGED'} by the correction")
    return summary


def _demo_replies(corrected_dir: Path, evaluation: dict[str, Any], *, images: bool, echo=print) -> dict[str, str]:
    """demo's step 5: ONNX Runtime replies, correction off and on, to a harmless text prompt
    and, for a multimodal model, to two image requests that ``evaluation`` (step 4, on the
    bundled held-out split) measured: a harmful one the correction turned into a refusal and
    the harmless one whose answer it changed least (``behaviour.showcase``)."""
    from .behaviour import showcase
    from .data import load_bundled
    from .data.render import DEFAULT_CARRIER, TWIN_SUFFIX, declared_renderer, render_text
    from .runtime.chat import reply

    heldout = load_bundled("heldout")
    by_id = {r.id: r for r in heldout}
    by_id.update({r.id + TWIN_SUFFIX: r for r in heldout})  # the evaluation's image rows carry the twin's id
    prompts = [("text", next(r for r in heldout if r.label == "harmless").instruction, None)]
    if images:
        renderer = declared_renderer(corrected_dir) or render_text
        picks = showcase(evaluation["generations"], evaluation["behaviour"]["markers"],
                         {id_: r.instruction for id_, r in by_id.items()})
        if picks["flipped"]:
            echo("      image requests picked from step 4: a harmful one answered uncorrected and refused "
                 "corrected, and the harmless one whose answer the correction changed least")
            harmful = by_id[picks["flipped"]]
        else:
            echo("      step 4 turned no harmful image request into a refusal; the first one:")
            harmful = next(r for r in heldout if r.label == "harmful")
        prompts.append(("image harmful", harmful.instruction, renderer(harmful.instruction)))
        if picks["kept"]:
            harmless = by_id[picks["kept"]]
            prompts.append(("image harmless", harmless.instruction, renderer(harmless.instruction)))
    replies = {}
    for kind, prompt, image in prompts:
        text = prompt if image is None else DEFAULT_CARRIER
        echo(f"      {kind} prompt: " + (repr(prompt) if image is None else f"[image of {prompt!r}] {text!r}"))
        for correct in (False, True):
            answer = reply(corrected_dir, text, image=image, max_new_tokens=40, correct=correct)
            echo(f"        {'corrected  ' if correct else 'uncorrected'}: " + answer["text"].replace("\n", " ")[:300])
            replies[f"{kind.replace(' ', '_')}_{'on' if correct else 'off'}"] = answer["text"]
    return replies
