"""Human and machine views of a calibration: report.json, the per-layer table, the plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT_FILENAME = "report.json"
PLOT_FILENAME = "separability.png"

TABLE_COLUMNS = (
    ("layer", "layer", "{:d}"),
    ("dprime_T", "d' text", "{:.2f}"),
    ("dprime_M", "d' mm", "{:.2f}"),
    ("auroc_T", "AUROC text", "{:.3f}"),
    ("auroc_M", "AUROC mm", "{:.3f}"),
    ("J_T", "J text", "{:.2f}"),
    ("J_M", "J mm", "{:.2f}"),
    ("collapse_ratio", "collapse", "{:.2f}"),
    ("drift_norm", "|drift|", "{:.2f}"),
    ("drift_cos_rhat", "cos(d,r)", "{:+.2f}"),
    ("auroc_M_probe", "AUROC mm probe", "{:.3f}"),
)


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    from ..io.atomic import write_json_atomic

    return write_json_atomic(Path(folder) / REPORT_FILENAME, json_safe(report))


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def geometry_table(report: dict[str, Any], *, title: str = "Geometry per layer"):
    from rich.table import Table

    rows = report["layers"]
    columns = [c for c in TABLE_COLUMNS if any(c[0] in r for r in rows)]
    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    opts = report.get("options", {})
    bands = {name: range(*opts[name]) for name in ("probe_band", "adaptive_band") if opts.get(name)}
    for row in rows:
        style = None
        if row["layer"] in bands.get("probe_band", ()):
            style = "cyan"
        elif row["layer"] in bands.get("adaptive_band", ()):
            style = "magenta"
        table.add_row(*(_cell(row, key, fmt) for key, _, fmt in columns), style=style)
    return table


def format_band(band: Any) -> str:
    """report.json stores a band as [start, end]; printed as the half-open Band it is."""
    from ..options import Band

    return str(Band(*band)) if isinstance(band, (list, tuple)) and len(band) == 2 else str(band)


def summary_lines(report: dict[str, Any]) -> list[str]:
    model = report.get("model", {})
    counts = report.get("counts", {})
    opts = report.get("options", {})
    lines = [
        f"model {model.get('source')} ({model.get('family')}, {model.get('num_layers')} blocks, hidden {model.get('hidden_size')})",
        "records " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f", pairs={report.get('pairs', 0)}",
        f"best layer {report['best_layer']}: training text AUROC {report['best_auroc_T']:.3f}",
        f"probe band {format_band(opts.get('probe_band'))} (cyan), adaptive band {format_band(opts.get('adaptive_band'))} "
        f"(magenta), mode {opts.get('mode')}",
    ]
    if "heldout" in report:
        heldout = report["heldout"]
        lines.append(f"held-out text AUROC at layer {report['best_layer']}: {heldout['auroc_T_at_best_layer']:.3f} "
                     f"({heldout['counts']['T+']} harmful, {heldout['counts']['T-']} harmless held-out prompts)")
    if "after" in report:
        after = report["after"]["layers"]
        best = report["best_layer"]
        before_m = report["layers"][best].get("auroc_M")
        after_m = after[best].get("auroc_M")
        if before_m is not None and after_m is not None:
            lines.append(f"multimodal AUROC at layer {best}: {before_m:.3f} before, {after_m:.3f} after {report['after']['mode']}")
    return lines


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib (the `plot`
    extra) is not installed: the plots are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plot(folder: Path, report: dict[str, Any]) -> Path | None:
    """A PNG of separability per layer; None when matplotlib (the `plot` extra) is absent."""
    plt = pyplot()
    if plt is None:
        return None
    rows = report["layers"]
    layers = [r["layer"] for r in rows]
    fig, (ax_d, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("dprime_T", "text"), ("dprime_M", "multimodal"), ("dprime_M_probe", "multimodal, probe")):
        if any(key in r for r in rows):
            ax_d.plot(layers, [r.get(key, math.nan) for r in rows], marker="o", ms=3, label=label)
    for key, label in (("auroc_T", "text"), ("auroc_M", "multimodal"), ("auroc_M_probe", "multimodal, probe")):
        if any(key in r for r in rows):
            ax_a.plot(layers, [r.get(key, math.nan) for r in rows], marker="o", ms=3, label=label)
    if "after" in report:
        after = report["after"]["layers"]
        label = f"multimodal, after {report['after']['mode']}"
        # The collapse shows as the multimodal d' below the text d'; after the correction it should close.
        ax_d.plot(layers, [r.get("dprime_M", math.nan) for r in after], ls="--", label=label)
        ax_a.plot(layers, [r.get("auroc_M", math.nan) for r in after], ls="--", label=label)
    ax_d.set(xlabel="layer", ylabel="d'", title="Separability along the refusal direction")
    ax_a.set(xlabel="layer", ylabel="AUROC", ylim=(0, 1.02), title="AUROC harmful vs harmless")
    for ax in (ax_d, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(folder) / PLOT_FILENAME
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure as PNG, written like every other file (``io.atomic.atomic_file``)."""
    from ..io.atomic import atomic_file

    with atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110)
    return Path(path)
