"""``regap-export calibrate``: fit on a model and a data file, write the directions folder.

Everything is computed in memory first (``calibration.calibrate``); the folder is written only
when it succeeded, into a temporary sibling renamed into place (``io.atomic``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..io.atomic import atomic_output_dir, check_output_dir
from ..io.checks import check_tensors_finite
from .fit import CalibrationResult, calibrate, heldout_report
from .directions_io import save_directions
from ..errors import ArtifactError
from ..models.loading import load_model
from ..options import RegapOptions
from .report import write_plot, write_report
from .stats import ActivationStats

STATS_FILENAME = "stats.safetensors"


def load_calibration_records(data: Path | None, *, label: str | None, split: str | None, render: bool,
                             multimodal: bool, renderer=None) -> list:
    from ..data import load_bundled, load_records, split_records, to_multimodal_pairs

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
    # The data first: a bad file is refused before any model is loaded.
    records = load_calibration_records(data, label=label, split=split, render=False, multimodal=False)
    loaded = load_model(model, dtype=dtype)
    from ..data import to_multimodal_pairs
    from ..data.render import declared_renderer

    renderer = declared_renderer(loaded.folder)
    if render and loaded.adapter.multimodal:
        records = to_multimodal_pairs(records, renderer=renderer)
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
