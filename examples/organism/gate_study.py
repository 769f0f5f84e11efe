"""The gate experiment behind RESULTS.md's "The gate, measured".

auroc: how well candidate gate directions sort harmful from harmless *image* requests that
    neither fitted them (val-wide), at the last prompt token with the probe correction on, per
    layer: the text refusal direction rhat (what the gate reads), the difference of the image
    classes' means, and a shrunk linear discriminant fitted on the calibration image rows
    (with its 5-fold out-of-fold AUROC on those rows, the honest estimate without val data).
sort: why no gate setting reaches the targets ("What bounds the gate"): per layer, the held-out
    AUROC of the refusal coordinate h . rhat for text requests and for their image twins, with
    the probe band's fixed correction at several strengths alpha0 (0 = uncorrected), and with
    the coordinate averaged over the post-instruction tokens instead of read at the last one.
    A mean-drift correction adds one vector to every image row, so at the layer it acts it
    cannot reorder them; only the layers after it can (ReGap's self-rectification).
(discriminant-gate, sessions 20-21, is now `regap-export calibrate --gate-read discriminant`: the
    same discriminant, at every layer, stored as the directions' gate_read beside rhat.)
gates: which of the two limits stops a harmful image request that the corrected model still
    answers ("Gate or correction"): each image request's gate at the last prompt token (every
    gated layer, in the corrected model's own prefill), grouped by corrected outcome, beside the
    outcome of the same export with the gate held open (--mode fixed at the same strength).
Sharper gates (every kappa times a factor), the other experiment there, are now the tool's
`--gate-sharpness` option (calibrate or export).

    python examples/organism/gate_study.py auroc runs/organism5/directions-c075 runs/organism5/val-wide.jsonl
    python examples/organism/gate_study.py sort runs/organism5/directions-c075 runs/organism5/val-wide.jsonl
    python examples/organism/gate_study.py gates REGAP_OUT runs/organism5/val-wide.jsonl --gate-open FIXED_OUT
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from regap_export.calibration.folder import load_calibration_records
from regap_export.calibration import probe_pass
from regap_export.calibration.capture import requests_for
from regap_export.data.render import declared_renderer
from regap_export.calibration.directions import discriminant
from regap_export.calibration.directions_io import load_directions
from regap_export.calibration.geometry import auroc
from regap_export.models.loading import load_model

FOLDS = 5


def out_of_fold_auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    scores_pos, scores_neg = torch.empty(len(pos), dtype=pos.dtype), torch.empty(len(neg), dtype=neg.dtype)
    for fold in range(FOLDS):
        keep_pos = torch.arange(len(pos)) % FOLDS != fold
        keep_neg = torch.arange(len(neg)) % FOLDS != fold
        w = discriminant(pos[keep_pos], neg[keep_neg])
        scores_pos[~keep_pos], scores_neg[~keep_neg] = pos[~keep_pos] @ w, neg[~keep_neg] @ w
    return auroc(scores_pos, scores_neg)


def probe_rows(loaded, bundle, records, layers, options=None, classes=("M+", "M-")):
    """Block outputs of ``classes``' requests at the read position, the probe correction on
    (``options``: the directions' own unless given)."""
    opts = (options or bundle.options).resolved(bundle.directions.num_layers)
    requests = [r for r in requests_for(records, loaded.adapter, loaded.processor) if r.class_key in classes]
    stats = probe_pass(loaded, bundle.directions, opts, requests, layers=layers)
    return stats.class_rows(classes[0]), stats.class_rows(classes[1])


def refusal_coordinate_aurocs(pos: torch.Tensor, neg: torch.Tensor, rhat: torch.Tensor,
                              layers: list[int]) -> list[float]:
    """AUROC of h . rhat_l, harmful vs harmless, for rows [n, len(layers), H] of those layers."""
    return [auroc(pos[:, i] @ rhat[layer].double(), neg[:, i] @ rhat[layer].double())
            for i, layer in enumerate(layers)]


def open_study(directions_dir: Path):
    """The directions bundle and the model it was fitted on."""
    bundle = load_directions(directions_dir)
    return bundle, load_model(bundle.model_source)


def study_records(loaded, path: Path | None, split: str | None = None) -> list:
    """A JSONL's records (the bundled set's ``split`` when ``path`` is None), each with its image
    twin rendered as the model declares."""
    return load_calibration_records(path, label=None, split=split, render=True, multimodal=True,
                                    renderer=declared_renderer(loaded.folder))


def sort_table(directions_dir: Path, heldout: Path, first_layer: int, strengths: list[float]) -> None:
    bundle, loaded = open_study(directions_dir)
    records = study_records(loaded, heldout)
    layers = list(range(first_layer, bundle.directions.num_layers))
    rhat = bundle.directions.rhat

    def column(classes, **changes):
        options = dataclasses.replace(bundle.options, **changes)
        return refusal_coordinate_aurocs(*probe_rows(loaded, bundle, records, layers, options, classes), rhat, layers)

    columns = {"text": column(("T+", "T-"))}
    for strength in strengths:
        columns[f"image a0={strength:g}"] = column(("M+", "M-"), alpha0=strength)
    columns["image post-instr."] = column(("M+", "M-"), read_position="post_instruction_mean")
    print(f"held-out AUROC of h . rhat (directions' alpha0 {bundle.options.alpha0:g} for the last column)")
    print("layer " + " ".join(f"{name:>18}" for name in columns))
    for i, layer in enumerate(layers):
        print(f"{layer:5d} " + " ".join(f"{values[i]:18.3f}" for values in columns.values()))


def auroc_table(directions_dir: Path, heldout: Path, first_layer: int) -> None:
    bundle, loaded = open_study(directions_dir)
    records = {"train": study_records(loaded, None, "train"), "heldout": study_records(loaded, heldout)}
    layers = list(range(first_layer, bundle.directions.num_layers))
    (pos, neg), (held_pos, held_neg) = (probe_rows(loaded, bundle, records[k], layers) for k in ("train", "heldout"))
    print("layer  held-out AUROC: rhat  image-means  discriminant | discriminant out-of-fold on train")
    for i, layer in enumerate(layers):
        candidates = (bundle.directions.rhat[layer].double(), pos[:, i].mean(0) - neg[:, i].mean(0),
                      discriminant(pos[:, i], neg[:, i]))
        held = [auroc(held_pos[:, i] @ d, held_neg[:, i] @ d) for d in candidates]
        print(f"{layer:5d}  {held[0]:20.3f}  {held[1]:11.3f}  {held[2]:12.3f} | "
              f"{out_of_fold_auroc(pos[:, i], neg[:, i]):.3f}")


def prompt_gates(loaded, checkpoint, records, batch_size: int = 8) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Each image record's gate sigmoid(h . w + b) at every gated layer, at the last prompt token,
    in the corrected model's own prefill (probe band and earlier gated layers applied), i.e. the
    strength behind the first reply token. Returns (gated layers, {record id: gates [layers]})."""
    from regap_export.method.correction import RegapCorrection
    from regap_export.evaluation import TorchEngine, _batches
    from regap_export.method.folding import GATED

    gated = sorted((m for m in loaded.model.modules() if isinstance(m, RegapCorrection) and m.kind == GATED),
                   key=lambda m: m.layer)
    if not gated:
        raise SystemExit("the folder has no gated layers: `gates` reads a --mode regap export")
    seen: dict[int, torch.Tensor] = {}

    def capture(module, args, kwargs):
        h = args[0] if args else kwargs["h"]
        seen[module.layer] = torch.sigmoid(h[:, -1].float() @ module.w + module.b)[:, 0]  # left-padded: -1 is the prompt's end

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in gated]
    engine, out = TorchEngine(loaded, checkpoint), {}
    try:
        images = [r for r in records if r.modality == "image"]
        for batch in _batches(images, loaded.adapter, loaded.processor, batch_size):
            ids, mask = batch.ids, batch.inputs["attention_mask"].astype("int64")
            prompt, _ = engine._masks(ids, correct=True)
            with torch.no_grad():
                loaded.model(**engine._tensors(batch, ids, mask), regap_image_mask=torch.from_numpy(prompt),
                             use_cache=False)
            for row, record in enumerate(batch.records):
                out[record.id] = torch.stack([seen[m.layer][row] for m in gated])
    finally:
        for handle in handles:
            handle.remove()
    return [m.layer for m in gated], out


def outcome_table(band_gate: dict[str, float], labels: dict[str, str], refused: dict[str, bool],
                  refused_gate_open: dict[str, bool] | None = None) -> list[dict]:
    """Image requests grouped by label and corrected outcome: how many, their band-mean gate
    (mean, and how many have it >= 0.5), and, given the same requests under the correction with
    the gate held open (``fixed`` at the same strength and layers), how many that refuses."""
    rows = []
    for label in ("harmful", "harmless"):
        for outcome in (True, False):
            ids = [i for i in band_gate if labels[i] == label and refused[i] == outcome]
            gates = torch.tensor([band_gate[i] for i in ids], dtype=torch.float64)
            rows.append({"label": label, "refused": outcome, "n": len(ids), "ids": ids,
                         "mean_gate": float(gates.mean()) if ids else float("nan"),
                         "gate_open": int((gates >= 0.5).sum()),
                         "refused_gate_open": (None if refused_gate_open is None
                                               else sum(refused_gate_open[i] for i in ids))})
    return rows


def image_refusals(folder: Path) -> tuple[dict[str, str], dict[str, bool]]:
    """(label, refused with the correction on) of each image request in FOLDER/evaluation.json."""
    import json

    from regap_export.evaluation.behaviour import is_refusal

    generations = [g for g in json.loads((folder / "evaluation.json").read_text())["generations"]
                   if g["modality"] == "image"]
    return {g["id"]: g["label"] for g in generations}, {g["id"]: is_refusal(g["text_on"]) for g in generations}


def gate_table(folder: Path, data: Path, gate_open: Path | None) -> None:
    from regap_export.evaluation import evaluation_records
    from regap_export.export.load import load_corrected, read_regap_checkpoint

    labels, refused = image_refusals(folder)
    refused_open = image_refusals(gate_open)[1] if gate_open is not None else None
    loaded = load_corrected(folder)
    records = [r for r in evaluation_records([data], multimodal=True, render=True,
                                             renderer=declared_renderer(folder)) if r.id in labels]
    layers, gates = prompt_gates(loaded, read_regap_checkpoint(folder), records)
    band = {i: float(g.mean()) for i, g in gates.items()}
    print(f"gate at the last prompt token, gated layers {layers[0]}..{layers[-1]} (band mean)")
    print("label     corrected  n   mean gate  gate >= 0.5" + ("  refused, gate held open" if refused_open else ""))
    rows = outcome_table(band, labels, refused, refused_open)
    for row in rows:
        extra = "" if row["refused_gate_open"] is None else f"  {row['refused_gate_open']:>23}"
        print(f"{row['label']:9} {'refused' if row['refused'] else 'answered':9} {row['n']:3d} "
              f"{row['mean_gate']:10.3f} {row['gate_open']:12d}{extra}")
    print("per layer, mean gate: " + " ".join(f"{layer}" for layer in layers))
    for row in rows:
        if row["ids"]:
            mean = torch.stack([gates[i] for i in row["ids"]]).mean(0)
            print(f"  {row['label']} {'refused' if row['refused'] else 'answered'}: "
                  + " ".join(f"{v:.2f}" for v in mean.tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("auroc", help="held-out AUROC of candidate gate directions per layer")
    a.add_argument("directions", type=Path)
    a.add_argument("heldout", type=Path, help="a JSONL split, e.g. data.py --jsonl val-wide")
    a.add_argument("--first-layer", type=int, default=12)
    s = sub.add_parser("sort", help="held-out AUROC of the refusal coordinate: text vs image, by probe strength")
    s.add_argument("directions", type=Path)
    s.add_argument("heldout", type=Path, help="a JSONL split, e.g. data.py --jsonl val-wide")
    s.add_argument("--first-layer", type=int, default=14)
    s.add_argument("--alpha0", default="0,0.75,1.25,2", help="probe strengths, comma-separated")
    t = sub.add_parser("gates", help="each image request's gate at the prompt's end, by corrected outcome")
    t.add_argument("folder", type=Path, help="an evaluated --mode regap export (reads its evaluation.json)")
    t.add_argument("data", type=Path, help="the JSONL that evaluation ran on")
    t.add_argument("--gate-open", type=Path, help="the same directions exported --mode fixed and evaluated: "
                   "the gate held open where alpha0 = alpha_max (fixed applies alpha_max on both bands)")
    args = ap.parse_args()
    if args.command == "gates":
        gate_table(args.folder, args.data, args.gate_open)
    elif args.command == "auroc":
        auroc_table(args.directions, args.heldout, args.first_layer)
    else:
        sort_table(args.directions, args.heldout, args.first_layer, [float(a) for a in args.alpha0.split(",")])


if __name__ == "__main__":
    main()
