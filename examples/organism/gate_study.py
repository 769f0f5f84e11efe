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
discriminant-gate: a directions folder whose gate reads, at each layer from --first-layer on,
    the shrunk discriminant of the calibration's probe-corrected image rows instead of rhat
    (anchors c+- and kappa refitted along it as calibrate fits them; drift and probe band
    unchanged). Not ReGap's gate, an experiment: export reads the folder as any other.
Sharper gates (every kappa times a factor), the other experiment there, are now the tool's
`--gate-sharpness` option (calibrate or export).

    python examples/organism/gate_study.py auroc runs/organism5/directions-c075 runs/organism5/val-wide.jsonl
    python examples/organism/gate_study.py sort runs/organism5/directions-c075 runs/organism5/val-wide.jsonl
    python examples/organism/gate_study.py discriminant-gate D F OUT   # F: the calibration data D was fitted on
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from regap_export.api import load_calibration_records
from regap_export.calibration import probe_pass
from regap_export.capture import requests_for
from regap_export.data.render import declared_renderer
from regap_export.directions import Directions, probe_anchors_and_kappa, projections
from regap_export.directions_io import load_directions, save_directions
from regap_export.geometry import auroc
from regap_export.models.loading import load_model

SHRINKAGE = 0.5
FOLDS = 5


def discriminant(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Fisher's direction with the covariance shrunk halfway to a scaled identity (180 rows, 576 dims)."""
    centred = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
    cov = centred.T @ centred / centred.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
    return torch.linalg.solve((1 - SHRINKAGE) * cov + SHRINKAGE * eye, pos.mean(0) - neg.mean(0))


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


def discriminant_gate(directions: Directions, pos: torch.Tensor, neg: torch.Tensor, layers: list[int],
                      tau: float) -> Directions:
    """``directions`` with rhat, c+-, kappa at ``layers`` read along the shrunk discriminant of the
    image rows [n, len(layers), H] (unit length; harmful rows project higher on average)."""
    rhat = directions.rhat.double().clone()
    for i, layer in enumerate(layers):
        w = discriminant(pos[:, i], neg[:, i])
        rhat[layer] = w / w.norm()
    c_pos, c_neg, kappa = probe_anchors_and_kappa(projections(pos, rhat[layers]), projections(neg, rhat[layers]), tau)
    anchor_pos, anchor_neg, slope = (t.clone() for t in (directions.anchor_probe_harmful,
                                                         directions.anchor_probe_harmless, directions.kappa))
    anchor_pos[layers], anchor_neg[layers], slope[layers] = c_pos.float(), c_neg.float(), kappa.float()
    return dataclasses.replace(directions, rhat=rhat.float(), anchor_probe_harmful=anchor_pos,
                               anchor_probe_harmless=anchor_neg, kappa=slope)


def write_discriminant_gate(directions_dir: Path, data: Path, out: Path, first_layer: int) -> None:
    bundle = load_directions(directions_dir)
    loaded = load_model(bundle.model_source)
    records = load_calibration_records(data, label=None, split=None, render=True, multimodal=True,
                                       renderer=declared_renderer(loaded.folder))
    layers = list(range(first_layer, bundle.directions.num_layers))
    pos, neg = probe_rows(loaded, bundle, records, layers)
    gated = discriminant_gate(bundle.directions, pos, neg, layers, bundle.options.tau)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {save_directions(out, dataclasses.replace(bundle, directions=gated))}; kappa "
          + " ".join(f"{float(gated.kappa[layer]):.2f}" for layer in layers))


def sort_table(directions_dir: Path, heldout: Path, first_layer: int, strengths: list[float]) -> None:
    bundle = load_directions(directions_dir)
    loaded = load_model(bundle.model_source)
    records = load_calibration_records(heldout, label=None, split=None, render=True, multimodal=True,
                                       renderer=declared_renderer(loaded.folder))
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
    bundle = load_directions(directions_dir)
    loaded = load_model(bundle.model_source)
    renderer = declared_renderer(loaded.folder)
    records = {name: load_calibration_records(path, label=None, split=split, render=True, multimodal=True,
                                              renderer=renderer)
               for name, path, split in (("train", None, "train"), ("heldout", heldout, None))}
    layers = list(range(first_layer, bundle.directions.num_layers))
    (pos, neg), (held_pos, held_neg) = (probe_rows(loaded, bundle, records[k], layers) for k in ("train", "heldout"))
    print("layer  held-out AUROC: rhat  image-means  discriminant | discriminant out-of-fold on train")
    for i, layer in enumerate(layers):
        candidates = (bundle.directions.rhat[layer].double(), pos[:, i].mean(0) - neg[:, i].mean(0),
                      discriminant(pos[:, i], neg[:, i]))
        held = [auroc(held_pos[:, i] @ d, held_neg[:, i] @ d) for d in candidates]
        print(f"{layer:5d}  {held[0]:20.3f}  {held[1]:11.3f}  {held[2]:12.3f} | "
              f"{out_of_fold_auroc(pos[:, i], neg[:, i]):.3f}")


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
    g = sub.add_parser("discriminant-gate", help="write directions whose gate reads an image-row discriminant")
    g.add_argument("directions", type=Path)
    g.add_argument("data", type=Path, help="the calibration data the directions were fitted on")
    g.add_argument("out", type=Path)
    g.add_argument("--first-layer", type=int, default=15)
    args = ap.parse_args()
    if args.command == "auroc":
        auroc_table(args.directions, args.heldout, args.first_layer)
    elif args.command == "discriminant-gate":
        write_discriminant_gate(args.directions, args.data, args.out, args.first_layer)
    else:
        sort_table(args.directions, args.heldout, args.first_layer, [float(a) for a in args.alpha0.split(",")])


if __name__ == "__main__":
    main()
