"""``regap-export demo``: the whole journey on one model (calibrate, export, validate, evaluate,
generate), each step reported."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .calibration.folder import calibrate_to_folder
from .calibration.report import format_band
from .errors import RegapError


# Options `regap-export tune` chose once for a model, shipped with it (options only: the demo fits
# its own directions with them). The file says how to reproduce them.
TUNED_OPTIONS_FILE = "tuned_options.json"


def tuned_options(model: str):
    """(options, gate read, what the file says) tuned once for ``model`` and shipped with it, or
    None (only the organism ships them: regap_export/models/organism/tuned_options.json)."""
    from .models.embedded import ORGANISM_DIR
    from .options import RegapOptions

    if model != "embedded:organism" or not (ORGANISM_DIR / TUNED_OPTIONS_FILE).is_file():
        return None
    shipped = json.loads((ORGANISM_DIR / TUNED_OPTIONS_FILE).read_text())
    return RegapOptions.from_json(json.dumps(shipped["options"])), shipped["gate_read"], shipped["described"]


def demo(model: str, out_dir: Path, *, per_label: int = 24, tuned: bool = True, echo=print) -> dict[str, Any]:
    """calibrate -> export -> validate -> evaluate -> generate on one model, each step reported.
    ``tuned``: calibrate with the options tune chose for this model, where it ships them."""
    import time

    from .options import RegapOptions

    from .data import load_bundled
    from .evaluation.evaluate import evaluate_folder, table_lines
    from .export.pipeline import export_to_folder
    from .io.atomic import write_file_atomic
    from .validation.parity import validate_folder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = load_bundled("train")
    subset = [r for r in train if r.label == "harmful"][:per_label] + [r for r in train if r.label == "harmless"][:per_label]
    data = out_dir / "calibration.jsonl"
    write_file_atomic(data, "".join(json.dumps({"id": r.id, "instruction": r.instruction, "label": r.label,
                                                "category": r.category}) + "\n" for r in subset))
    summary: dict[str, Any] = {}
    start = time.perf_counter()
    shipped = tuned_options(model) if tuned else None
    options, gate_read = (RegapOptions(), "refusal") if shipped is None else shipped[:2]
    echo(f"[1/5] calibrate {model} on {len(subset)} bundled prompts (+ image twins) -> {out_dir / 'directions'}")
    if shipped is not None:
        echo(f"      with the options `regap-export tune` chose for it ({shipped[2]}; "
             f"regap_export/models/organism/{TUNED_OPTIONS_FILE})")
    result = calibrate_to_folder(model, out_dir / "directions", data=data, force=True, show_progress=True,
                                 options=options, gate_read=gate_read)
    report = result.report
    echo(f"      best layer {report['best_layer']}, text AUROC {report['best_auroc_T']:.3f}; "
         f"mode {report['options']['mode']}, probe band {format_band(report['options']['probe_band'])}, "
         f"adaptive band {format_band(report['options']['adaptive_band'])}, positions {report['options']['positions']}"
         + ("" if gate_read == "refusal" else f", gate read {gate_read}"))
    summary["calibrate"] = {"best_layer": report["best_layer"], "auroc_T": report["best_auroc_T"],
                            "tuned_options": shipped is not None}
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
    from .evaluation.behaviour import showcase
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
