"""regap-export: fit ReGap's directions, export corrected models, prove parity."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .options import RegapOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fit ReGap's drift-correction directions and export corrected models.")
# Piped into a log, rich would size its tables to COLUMNS or 80 and cut every number to "0.9…";
# a pipe has no width (COLUMNS is a terminal's; pytest-xdist workers export 80), so the tables
# get as wide as their contents.
PIPED_WIDTH = 240
out = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)
err = Console(stderr=True)


def _print_plain(text: str) -> None:
    """Print text as written: tables stay one row per line when piped (no wrapping at 80
    columns), and brackets in replies, paths or intervals are not read as rich markup (a reply
    with "[/]" would raise). Rich tables (geometry, parity) go through ``out.print``."""
    out.print(text, highlight=False, markup=False, soft_wrap=True)


MODEL_HELP = "Model folder, or embedded:smolvlm (default) / embedded:smollm2 / embedded:organism."


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg="red")
    raise typer.Exit(2)


# What the [export] extra installs: a runtime-only install (regap-export[runtime]) lacks them.
EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "gguf", "accelerate")


def _run(fn):
    """Run a command body; user errors print one clear line and exit 2."""
    from .io.atomic import filesystem_error_in
    from .errors import RegapError

    try:
        return fn()
    except RegapError as exc:
        _fail(exc)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        _fail(RegapError(f"this command needs {exc.name}, which is not installed (a runtime-only install "
                         "runs generate only)", hint='pip install "regap-export[export]"'))
    except OSError as exc:  # read-only, not a directory, no space, permission: the user's file system
        user_error = filesystem_error_in(exc)
        if user_error is None:
            raise
        _fail(user_error)


def _quiet_transformers() -> None:
    """Keep stdout/stderr clean for --json: transformers' own loading bars off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# calibrate's option defaults are the library's (one place to change them: regap_export/options.py)
DEFAULTS = RegapOptions()

POSITIONS_HELP = ("Where the correction acts: last+generated (image inputs: last prompt token and generated "
                  "tokens) | image (image inputs, from the first image token on) | all (every input, METHOD's first reading).")


GATE_SHARPNESS_HELP = ("Factor on every fitted gate slope kappa (1: as fitted). Above 1 the gate is closer to a "
                       "switch: requests scored past tau get nearly the full strength, those below it nearly none.")


GATE_READ_HELP = ("What the gate projects on: refusal (rhat, ReGap's gate) | discriminant (per layer, the shrunk "
                  "linear discriminant of the harmful vs harmless image rows with the probe correction on; "
                  "needs image records; writes directions format 3).")


LAYER_DRIFT_HELP = ("What each corrected layer subtracts: increment (the drift added since the previous corrected "
                    "layer; the corrections add up to d_l) | total (d_l at every layer, METHOD's first reading).")


def _options(read_position, drift_component, probe_band, adaptive_band, alpha0, alpha_max, tau, mode, positions,
             layer_drift, gate_sharpness):
    from .options import Band, RegapOptions

    return RegapOptions(
        read_position=read_position, drift_component=drift_component,
        probe_band=Band.parse(probe_band, option="--probe-band") if probe_band else None,
        adaptive_band=Band.parse(adaptive_band, option="--adaptive-band") if adaptive_band else None,
        alpha0=alpha0, alpha_max=alpha_max, tau=tau, mode=mode, positions=positions, layer_drift=layer_drift,
        gate_sharpness=gate_sharpness,
    )


@app.command()
def calibrate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help="Calibration file (.jsonl, .csv, .txt). Default: the bundled set."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder for directions.safetensors and report.json."),
    label: Optional[str] = typer.Option(None, help="Label for every prompt of a .csv/.txt file without a label column."),
    split: Optional[str] = typer.Option(None, help="Use only records of this split (train|heldout). Default: train for the bundled set, all otherwise."),
    render: bool = typer.Option(True, help="For multimodal models, add a typographic image twin of every text record."),
    read_position: str = typer.Option(DEFAULTS.read_position, help="last | post_instruction_mean"),
    drift_component: str = typer.Option(DEFAULTS.drift_component, help="full | refusal"),
    probe_band: Optional[str] = typer.Option(None, help="START:END (half-open). Default L/4:L/2."),
    adaptive_band: Optional[str] = typer.Option(None, help="START:END (half-open). Default L/2:3L/4."),
    alpha0: float = typer.Option(DEFAULTS.alpha0, help="Probe-band strength."),
    alpha_max: float = typer.Option(DEFAULTS.alpha_max, help="Adaptive-band (and fixed-mode) strength."),
    tau: float = typer.Option(DEFAULTS.tau, help="Gate threshold on the normalised refusal coordinate."),
    gate_sharpness: float = typer.Option(DEFAULTS.gate_sharpness, help=GATE_SHARPNESS_HELP),
    gate_read: str = typer.Option("refusal", help=GATE_READ_HELP),
    mode: str = typer.Option(DEFAULTS.mode, help="regap | fixed | regap-seq (used for the after-correction table)."),
    positions: str = typer.Option(DEFAULTS.positions, help=POSITIONS_HELP),
    layer_drift: str = typer.Option(DEFAULTS.layer_drift, help=LAYER_DRIFT_HELP),
    batch_size: int = typer.Option(8, min=1),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16 for the forward passes."),
    after: bool = typer.Option(True, help="Measure the geometry again with the correction applied."),
    save_stats: bool = typer.Option(False, help="Also write stats.safetensors (mergeable per-record activations)."),
    merge_stats: Optional[List[Path]] = typer.Option(None, help="Skip capture: merge these stats.safetensors files (shards of --data)."),
    plot: bool = typer.Option(True, help="Write separability.png (needs matplotlib, the `plot` extra)."),
    force: bool = typer.Option(False, help="Replace --out if it is a folder regap-export wrote (never one holding other files or inputs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
):
    """Fit the refusal and drift directions and report the geometry per layer."""

    def body():
        import regap_export as rx
        from .io.atomic import check_output_dir
        from .calibration.report import json_safe
        from .calibration.report import geometry_table, summary_lines

        check_output_dir(out_dir, force=force, inputs=[data, model, *(merge_stats or [])])
        if as_json:
            _quiet_transformers()
        opts = _options(read_position, drift_component, probe_band, adaptive_band, alpha0, alpha_max, tau, mode,
                        positions, layer_drift, gate_sharpness)
        result = rx.calibrate_to_folder(
            model, out_dir, data=data, label=label, split=split, render=render, options=opts,
            batch_size=batch_size, dtype=dtype, measure_after=after, save_stats=save_stats,
            merge_stats=merge_stats or [], plot=plot, force=force, show_progress=not as_json, gate_read=gate_read,
        )
        if as_json:
            print(json.dumps(json_safe(result.report), sort_keys=True))
            return
        out.print(geometry_table(result.report))
        for line in summary_lines(result.report):
            _print_plain(line)
        _print_plain(f"wrote {out_dir}")

    _run(body)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A directions folder (or an exported folder)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Show what is inside a directions or exported folder."""

    def body():
        import regap_export as rx
        from .inspection import describe_lines

        info = rx.describe(path)
        if as_json:
            print(json.dumps(info, sort_keys=True))
            return
        for line in describe_lines(info):
            _print_plain(line)

    _run(body)


@app.command("export")
def export_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the model the directions were fitted on."),
    directions: Path = typer.Option(..., "--directions", help="Folder written by calibrate."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder."),
    formats: str = typer.Option("onnx,safetensors", "--format", help="Comma-separated: onnx, safetensors."),
    precision: str = typer.Option("fp32", "--precision",
                                  help="Comma-separated ONNX precisions: fp32, fp16, q4f16, q8, q4 (transformers.js's "
                                       "dtypes and file names). fp32 is always written: the others are made from it."),
    dtype: Optional[str] = typer.Option(None, hidden=True),
    mode: Optional[str] = typer.Option(None, help="regap | fixed | regap-seq. Default: the directions' mode."),
    probe_band: Optional[str] = typer.Option(None, help="Override START:END."),
    adaptive_band: Optional[str] = typer.Option(None, help="Override START:END."),
    alpha0: Optional[float] = typer.Option(None, help="Override the probe-band strength."),
    alpha_max: Optional[float] = typer.Option(None, help="Override the adaptive strength."),
    tau: Optional[float] = typer.Option(None, help="Override the gate threshold."),
    gate_sharpness: Optional[float] = typer.Option(None, help="Override. " + GATE_SHARPNESS_HELP),
    positions: Optional[str] = typer.Option(None, help="Override where the correction acts. " + POSITIONS_HELP),
    layer_drift: Optional[str] = typer.Option(None, help="Override. " + LAYER_DRIFT_HELP),
    force: bool = typer.Option(False, help="Replace --out if it is a folder regap-export wrote (never one holding other files or inputs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Write the corrected model: safetensors checkpoint and ONNX graphs, with a manifest."""

    def body():
        from .io.artifacts import read_manifest
        import regap_export as rx
        from .export.pipeline import parse_formats
        from .errors import RegapError
        from .export.precision import parse_precisions
        from .options import Band

        if dtype is not None:
            raise RegapError("export has no --dtype: the graphs are traced in float32 and converted to the precisions "
                             "you name", field="--dtype", hint=f"use --precision fp32,{'fp16' if dtype == 'fp16' else dtype}")

        if as_json:
            _quiet_transformers()
        overrides = {"mode": mode, "alpha0": alpha0, "alpha_max": alpha_max, "tau": tau, "positions": positions,
                     "layer_drift": layer_drift, "gate_sharpness": gate_sharpness,
                     "probe_band": Band.parse(probe_band, option="--probe-band") if probe_band else None,
                     "adaptive_band": Band.parse(adaptive_band, option="--adaptive-band") if adaptive_band else None}
        folder = rx.export_to_folder(model, directions, out_dir, formats=parse_formats(formats),
                                     precisions=parse_precisions(precision), overrides=overrides, force=force)
        manifest = read_manifest(folder)
        if as_json:
            print(json.dumps(manifest, sort_keys=True))
            return
        for rel, entry in manifest["files"].items():
            _print_plain(f"  {entry['bytes']:>12,d}  {rel}")
        _print_plain(f"wrote {folder} (mode {manifest['mode']}, {', '.join(manifest['precisions']) or 'no ONNX'})")

    _run(body)


@app.command()
def validate(
    path: Path = typer.Argument(..., help="A folder written by export."),
    device: str = typer.Option("cpu", help="cpu | cuda (ONNX Runtime's execution provider)."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated ONNX precisions to check (default: every "
                                            "one the export wrote; each has its own rule, listed in parity.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print parity.json instead of a table."),
):
    """Prove parity: the reference vs the rewritten PyTorch model and ONNX Runtime.

    Exit 0: parity holds; 1: a parity check failed; 2: the folder is missing, tampered with
    (size or sha256 differs from the manifest), corrupt, or an option is invalid.
    """

    def body():
        import regap_export as rx

        if as_json:
            _quiet_transformers()
        wanted = None if precision is None else [p.strip() for p in precision.split(",") if p.strip()]
        report = rx.validate_folder(path, device=device, precisions=wanted)
        if as_json:
            print(json.dumps(report, sort_keys=True))
        else:
            out.print(parity_table(report))
            _print_plain(("PASS" if report["ok"] else "FAIL") + f": wrote {path / 'parity.json'}")
        if not report["ok"]:
            raise typer.Exit(1)

    _run(body)


def parity_table(report):
    from rich.table import Table

    precisions = report.get("precisions") or [report.get("dtype", "fp32")]
    table = Table(title=f"Parity ({report['mode']}, {', '.join(precisions)}, {report['device']})")
    for header in ("target", "precision", "inputs", "quantity", "max |diff|", "ok", "detail"):
        table.add_column(header)
    for c in report["checks"]:
        precision = "" if c["target"] == "pytorch" else c.get("precision", "fp32")
        table.add_row(c["target"], precision, c["inputs"], c["quantity"], f"{c['max_abs_diff']:.3g}",
                      "yes" if c["ok"] else "[red]NO[/]", c["detail"])
    return table


@app.command()
def generate(
    path: Path = typer.Argument(..., help="A folder written by export (with onnx)."),
    prompt: str = typer.Option(..., "--prompt", help="The user message."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image for multimodal exports."),
    max_new_tokens: int = typer.Option(64, min=1),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    precision: str = typer.Option("fp32", help="Which of the export's graphs: fp32 | fp16 | q4f16 | q8 | q4."),
    verify_hashes: bool = typer.Option(True, help="Check every file's sha256 against the manifest first "
                                       "(sizes and the constants' finiteness are always checked)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Generate a reply with ONNX Runtime (greedy, KV cache; needs no PyTorch). --json also gives the
    prompt's and the reply's token ids (prompt_token_ids, new_token_ids)."""

    def body():
        import regap_export as rx

        answer = rx.generate(path, prompt, image=image, max_new_tokens=max_new_tokens, device=device,
                             verify_hashes=verify_hashes, precision=precision)
        if as_json:
            print(json.dumps(answer, sort_keys=True))
        else:
            _print_plain(answer["text"])

    _run(body)


@app.command()
def evaluate(
    path: Path = typer.Argument(..., help="A folder written by export."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Evaluation data (repeatable): .jsonl/.csv/.txt, "
                                              "or an MM-SafetyBench folder / FigStep safebench.csv. Default: the "
                                              "bundled held-out split."),
    split: Optional[str] = typer.Option(None, help="Use only records of this split (train|heldout)."),
    runtime: str = typer.Option("onnxruntime", help="onnxruntime (the exported graphs) | pytorch (the checkpoint)."),
    max_new_tokens: int = typer.Option(32, min=1, help="Greedy tokens per reply."),
    kl_positions: int = typer.Option(8, min=0, help="Generated positions over which KL(off || on) is averaged."),
    markers: Optional[Path] = typer.Option(None, help="Refusal markers file (one per line; default: the built-in list)."),
    limit: Optional[int] = typer.Option(None, help="At most N records per label (and their image twins)."),
    render: bool = typer.Option(True, help="Give text records an image twin (multimodal models)."),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("cpu", help="cpu | cuda (ONNX Runtime's execution provider)."),
    plot: bool = typer.Option(True, help="Write evaluation.png (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print evaluation.json instead of a table."),
):
    """Measure refusal, attack success, over-refusal and utility with the correction off vs on."""

    def body():
        import regap_export as rx
        from .evaluation.evaluate import table_lines

        if as_json:
            _quiet_transformers()
        report = rx.evaluate_folder(path, data or [], split=split, runtime=runtime, max_new_tokens=max_new_tokens,
                                 kl_positions=kl_positions, markers_file=markers, limit=limit, render=render,
                                 batch_size=batch_size, device=device, plot=plot, show_progress=not as_json)
        if as_json:
            print(json.dumps(report, sort_keys=True))
            return
        for line in table_lines(report):
            _print_plain(line)
        _print_plain(f"wrote {path / 'evaluation.json'}")

    _run(body)


@app.command()
def compare(
    first: Path = typer.Argument(..., help="A folder evaluated with `evaluate` (or its evaluation.json): A."),
    second: Path = typer.Argument(..., help="Another evaluation of the same records: B."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON instead of a table."),
):
    """Compare two evaluations of the same records: corrected refusal per modality and label, paired."""

    def body():
        import regap_export as rx
        from .evaluation.comparison import format_comparison

        result = rx.compare_evaluations(rx.read_evaluation(first), rx.read_evaluation(second),
                                        names=(str(first), str(second)))
        if as_json:
            print(json.dumps(result, sort_keys=True))
            return
        _print_plain(format_comparison(result))

    _run(body)


@app.command()
def tune(
    model: str = typer.Argument(..., help=MODEL_HELP.replace("embedded:smolvlm (default) / ", "embedded:smolvlm / ")),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Data (repeatable): .jsonl/.csv/.txt, or an "
                                              "MM-SafetyBench folder / FigStep safebench.csv. Default: the bundled "
                                              "set's train split."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: directions.safetensors with the chosen options, "
                                                    "tune.json, frontier.png."),
    label: Optional[str] = typer.Option(None, help="Label for every prompt of a .csv/.txt file without a label column."),
    split: Optional[str] = typer.Option(None, help="Use only records of this split (train|heldout). Default: train "
                                                   "for the bundled set, all otherwise."),
    over_refusal_budget: float = typer.Option(3.0, help="Percentage points of harmless image requests the chosen "
                                                        "options may refuse beyond the text path's own rate."),
    shares: str = typer.Option("0.5,0.3,0.2", help="Shares of the records for the fit, selection and report parts."),
    group_by: str = typer.Option("pair", help="What stays in one part: pair (a record and its image twin) | category "
                                              "(every record of a category: requests built from one object or family)."),
    seed: int = typer.Option(0, help="Seed of the split."),
    modes: str = typer.Option("regap,fixed,regap-seq", help="Modes searched, comma-separated (transformers.js and "
                                                            "ONNX Runtime GenAI run regap and fixed only)."),
    confirm: int = typer.Option(3, min=1, help="Candidates confirmed by export and generation besides the default."),
    limit: Optional[int] = typer.Option(None, help="At most N records per label (and their image twins)."),
    max_new_tokens: int = typer.Option(32, min=1, help="Greedy tokens per confirming reply."),
    markers: Optional[Path] = typer.Option(None, help="Refusal markers file (one per line; default: the built-in list)."),
    render: bool = typer.Option(True, help="Give text records an image twin."),
    batch_size: int = typer.Option(8, min=1, help="Records per batch of the fit's capture and of the replies."),
    search_batch_size: int = typer.Option(32, min=1, help="Image records per prefill of the search (each candidate "
                                                          "costs one token per record: larger batches amortize it)."),
    plot: bool = typer.Option(True, help="Write frontier.png (needs matplotlib)."),
    force: bool = typer.Option(False, help="Replace --out if it is a folder regap-export wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print tune.json instead of the summary."),
):
    """Choose the correction's operating point on your data: fit, search by a proxy, confirm by generation."""

    def body():
        import regap_export as rx
        from .evaluation.behaviour import load_markers
        from .evaluation.tune import summary_lines

        try:
            parts = tuple(float(x) for x in shares.split(","))
        except ValueError:
            raise rx.RegapError(f"--shares must be three numbers such as 0.5,0.3,0.2, got {shares!r}") from None
        if as_json:
            _quiet_transformers()
        report = rx.tune_to_folder(model, out_dir, data or [], split=split, label=label, limit=limit,
                                   over_refusal_budget=over_refusal_budget, shares=parts, seed=seed,
                                   group_by=group_by, confirm=confirm, max_new_tokens=max_new_tokens,
                                   modes=[m.strip() for m in modes.split(",") if m.strip()],
                                   markers=load_markers(markers) if markers else None, render=render,
                                   batch_size=batch_size, search_batch_size=search_batch_size, plot=plot,
                                   force=force, show_progress=not as_json,
                                   echo=None if as_json else _print_plain)
        if as_json:
            print(json.dumps(report, sort_keys=True))
            return
        for line in summary_lines(report, out_dir):
            _print_plain(line)

    _run(body)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Working folder (replaced)."),
    model: str = typer.Option("embedded:organism", help="Model folder, or embedded:organism (default: the model "
                              "organism with a real safety gap) / embedded:smolvlm / embedded:smollm2."),
    records: int = typer.Option(24, help="Bundled training records per label (with image twins for multimodal)."),
    tuned: bool = typer.Option(True, help="Calibrate with the options `tune` chose for the model where it ships "
                                          "them (the organism); --no-tuned: calibrate's defaults."),
):
    """The whole journey on the embedded model organism: calibrate, export, validate, evaluate, generate."""

    def body():
        import regap_export as rx

        rx.demo(model, out_dir, per_label=records, tuned=tuned, echo=_print_plain)

    _run(body)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
