"""The calibration journey: capture, fit directions, measure the probe pass, report geometry."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .capture import capture, requests_for
from .directions import (Directions, discriminant_read, drift_direction, fitted_directions, projections,
                         refusal_direction, require_classes)
from ..data.records import records_fingerprint
from .directions_io import DirectionsFile
from ..errors import DataError, RegapError
from ..method.folding import fold, probe_only
from .geometry import cosine, separability
from ..models.loading import LoadedModel
from ..models.weight_sample import weight_sample_json
from ..options import RegapOptions
from ..method.rewrite import corrected
from .stats import ActivationStats


@dataclass
class CalibrationResult:
    bundle: DirectionsFile
    report: dict[str, Any]
    stats: ActivationStats


def calibration_sha256(records: Sequence[Any]) -> str:
    """Hash of the calibration set's content, independent of record order (shards merge)."""
    return records_fingerprint(sorted(records, key=lambda r: r.id))


def check_records_fit_model(records: Sequence[Any], loaded: LoadedModel) -> None:
    if loaded.adapter.multimodal:
        return
    for record in records:
        if record.modality == "image":
            raise DataError(
                f"record {record.id!r} has an image, but {loaded.source} ({loaded.adapter.family}) is a text-only model",
                path=record.source, line=record.line, field="image",
                hint="drop image records, or calibrate a multimodal model",
            )


def require_text_classes(records: Sequence[Any]) -> None:
    """Enough harmful and harmless text records, checked before the capture; names the data file."""
    from ..data.records import CLASS_NAMES
    from .directions import MIN_PER_CLASS

    if not all(hasattr(r, "class_key") for r in records):
        return
    sources = sorted({str(r.source) for r in records if getattr(r, "source", None) is not None})
    for key in ("T+", "T-"):
        count = sum(r.class_key == key for r in records)
        if count < MIN_PER_CLASS:
            raise DataError(f"the refusal direction needs at least {MIN_PER_CLASS} records of class {key} "
                            f"({CLASS_NAMES[key]}), the calibration data has {count}",
                            path=", ".join(sources) or None,
                            hint=f"add {'harmful' if key == 'T+' else 'harmless'} text records to the data file")


def _read_tokens(loaded: LoadedModel, options: RegapOptions) -> int:
    if options.read_position == "last":
        return 1
    return loaded.adapter.post_instruction_length(loaded.processor)


def capture_statistics(loaded: LoadedModel, records: Sequence[Any], options: RegapOptions, *,
                       batch_size: int = 8, show_progress: bool = True) -> ActivationStats:
    """Pass 1: every record's block outputs at the read position (mergeable across shards)."""
    check_records_fit_model(records, loaded)
    requests = requests_for(records, loaded.adapter, loaded.processor)
    return capture(loaded.model, loaded.adapter, loaded.processor, requests,
                   read_tokens=_read_tokens(loaded, options), batch_size=batch_size,
                   description="capture", show_progress=show_progress)


def probe_pass(loaded: LoadedModel, directions: Directions, options: RegapOptions, requests: Sequence[Any], *,
               layers: Sequence[int] | None = None, batch_size: int = 8, show_progress: bool = True
               ) -> ActivationStats:
    """Pass 2: block outputs at the read position with the probe band's fixed correction on
    (where METHOD measures the gate's anchors c+- and fits kappa); ``options`` resolved."""
    with corrected(loaded.model, loaded.adapter, probe_only(directions, options)):
        return capture(loaded.model, loaded.adapter, loaded.processor, requests, layers=layers,
                       read_tokens=_read_tokens(loaded, options), batch_size=batch_size,
                       description="probe pass", show_progress=show_progress,
                       correction_positions=options.positions)


GATE_READS = ("refusal", "discriminant")


def provisional_directions(rhat: torch.Tensor, drift: torch.Tensor, a_pos: torch.Tensor, a_neg: torch.Tensor
                           ) -> Directions:
    """Directions before the probe pass: enough for ``probe_only`` (the probe band's fixed
    correction needs the drift alone); the gate's anchors are placeholders."""
    return Directions(rhat.float(), drift.float(), a_pos.float(), a_neg.float(), a_pos.float(), a_neg.float(),
                      torch.zeros(rhat.shape[0]))


def calibrate(loaded: LoadedModel, records: Sequence[Any], options: RegapOptions = RegapOptions(), *,
              batch_size: int = 8, stats: ActivationStats | None = None, measure_after: bool = True,
              show_progress: bool = True, gate_read: str = "refusal") -> CalibrationResult:
    """Fit ReGap's directions on ``records`` and measure the geometry before and after.

    ``gate_read``: what the gate projects on. "refusal" is ReGap's gate (rhat, from the text
    classes); "discriminant" reads, per layer, the shrunk linear discriminant of the image
    rows M+ / M- with the probe correction on (``directions.discriminant``), a gate that sorts
    image requests by how image requests differ rather than by the text's refusal direction.
    The correction itself (drift, bands, strengths) is the same either way."""
    if gate_read not in GATE_READS:
        raise RegapError(f"unknown gate read {gate_read!r}; choose one of {', '.join(GATE_READS)}")
    check_records_fit_model(records, loaded)
    require_text_classes(records)
    num_layers = loaded.adapter.num_layers(loaded.model)
    opts = options.resolved(num_layers)
    if stats is None:
        stats = capture_statistics(loaded, records, opts, batch_size=batch_size, show_progress=show_progress)
    elif sorted(stats.ids) != sorted(r.id for r in records):
        raise RegapError("the statistics do not cover exactly the records of the data file",
                         hint="merge statistics captured from the shards of this very file")
    require_classes(stats, ("T+", "T-"), why="the refusal direction")
    rhat, a_pos, a_neg = refusal_direction(stats)
    drift = drift_direction(stats, rhat, opts.drift_component)

    multimodal = stats.count("M+") > 0 or stats.count("M-") > 0
    requests = requests_for(records, loaded.adapter, loaded.processor)
    read_tokens = _read_tokens(loaded, opts)
    read = None
    if multimodal:
        require_classes(stats, ("M+", "M-"), why="the probe anchors and kappa")
        image_requests = [r for r in requests if r.class_key in ("M+", "M-")]
        probe_stats = probe_pass(loaded, provisional_directions(rhat, drift, a_pos, a_neg), opts, image_requests,
                                 batch_size=batch_size, show_progress=show_progress)
        gate_rows = {key: probe_stats.class_rows(key) for key in ("M+", "M-")}
        if gate_read == "discriminant":
            read = discriminant_read(gate_rows["M+"], gate_rows["M-"])
    else:
        if gate_read == "discriminant":
            raise RegapError("--gate-read discriminant is fitted on image records (M+ and M-); the data has none",
                             hint="add image records (or image twins) to the calibration data, or read rhat")
        gate_rows = {"M+": stats.class_rows("T+"), "M-": stats.class_rows("T-")}
    probe_proj = {key: projections(rows, rhat) for key, rows in gate_rows.items()}
    directions = fitted_directions(rhat, drift, a_pos, a_neg, gate_rows, opts.tau, read)

    report = geometry_report(stats, rhat, drift, a_pos, a_neg, probe_proj if multimodal else None)
    if measure_after and multimodal:
        after_mode = "regap" if opts.mode == "regap-seq" else opts.mode
        after_opts = dataclasses.replace(opts, mode=after_mode)
        with corrected(loaded.model, loaded.adapter, fold(directions, after_opts)):
            after = capture(loaded.model, loaded.adapter, loaded.processor, requests,
                            read_tokens=read_tokens, batch_size=batch_size,
                            description="after correction", show_progress=show_progress,
                            correction_positions=opts.positions)
        report["after"] = {"mode": after_mode,
                           "layers": separability_rows(after, rhat, (a_pos + a_neg) / 2)}
    report["options"] = json.loads(opts.to_json())
    report["gate_read"] = gate_read
    report["model"] = {"source": loaded.source, "family": loaded.adapter.family,
                       "num_layers": num_layers, "hidden_size": int(rhat.shape[1]),
                       "fingerprint": loaded.fingerprint}
    report["counts"] = {key: stats.count(key) for key in ("T+", "T-", "M+", "M-")}
    report["pairs"] = len(stats.pair_indices())
    bundle = DirectionsFile(directions, opts, loaded.fingerprint, calibration_sha256(records), loaded.source,
                            weight_sample_json(loaded.model))
    report["calibration_sha256"] = bundle.calibration_sha256
    return CalibrationResult(bundle, report, stats)


def separability_rows(stats: ActivationStats, rhat: torch.Tensor, midpoint: torch.Tensor) -> list[dict[str, float]]:
    """Per layer and modality: d', AUROC and J of the refusal projection."""
    proj = {key: projections(stats.class_rows(key), rhat) if stats.count(key) else None
            for key in ("T+", "T-", "M+", "M-")}
    rows = []
    for layer in range(rhat.shape[0]):
        row: dict[str, float] = {"layer": layer}
        for modality in ("T", "M"):
            pos, neg = proj[modality + "+"], proj[modality + "-"]
            if pos is None or neg is None:
                continue
            for name, value in separability(pos[:, layer], neg[:, layer], float(midpoint[layer])).items():
                row[f"{name}_{modality}"] = value
        rows.append(row)
    return rows


def geometry_report(stats: ActivationStats, rhat: torch.Tensor, drift: torch.Tensor, a_pos: torch.Tensor,
                    a_neg: torch.Tensor, probe_proj: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """METHOD section 2, per layer, plus the separability of M under the probe correction."""
    midpoint = (a_pos + a_neg) / 2
    rows = separability_rows(stats, rhat, midpoint)
    mean_norm = stats.rows.norm(dim=-1).mean(0)
    for layer, row in enumerate(rows):
        d = drift[layer]
        if "dprime_M" in row and row["dprime_T"] not in (0.0,):
            row["collapse_ratio"] = row["dprime_M"] / row["dprime_T"]
        row["drift_norm"] = float(d.norm())
        row["drift_rel"] = float(d.norm() / mean_norm[layer]) if mean_norm[layer] > 0 else float("nan")
        row["drift_cos_rhat"] = cosine(d, rhat[layer])
        row["drift_along_gap"] = float(d @ rhat[layer] / (a_pos[layer] - a_neg[layer]))
        if probe_proj is not None:
            probed = separability(probe_proj["M+"][:, layer], probe_proj["M-"][:, layer], float(midpoint[layer]))
            row.update({f"{name}_M_probe": value for name, value in probed.items()})
    best = max(range(len(rows)), key=lambda l: (rows[l]["auroc_T"], rows[l]["dprime_T"]))
    return {"layers": rows, "best_layer": best, "best_auroc_T": rows[best]["auroc_T"]}


def heldout_report(loaded: LoadedModel, bundle: DirectionsFile, records: Sequence[Any], *,
                   batch_size: int = 8, show_progress: bool = True) -> dict[str, Any]:
    """Separability of held-out records along the fitted (training) refusal direction."""
    check_records_fit_model(records, loaded)
    requests = requests_for(records, loaded.adapter, loaded.processor)
    read_tokens = _read_tokens(loaded, bundle.options)
    stats = capture(loaded.model, loaded.adapter, loaded.processor, requests, read_tokens=read_tokens,
                    batch_size=batch_size, description="held-out", show_progress=show_progress)
    d = bundle.directions
    rows = separability_rows(stats, d.rhat.double(), (d.anchor_text_harmful.double() + d.anchor_text_harmless.double()) / 2)
    return {"counts": {key: stats.count(key) for key in ("T+", "T-", "M+", "M-")}, "layers": rows}
