"""`regap-export tune`: the correction's operating point chosen for one model on the user's data.

1. **Split** the records into a fitting, a selection and a report part (``operating_point.split_records``):
   a text record and its image twin never straddle two parts.
2. **Fit** the directions once on the fitting part (calibrate's capture and fit), and the gate's
   anchors and kappa for every probe setting the candidates use (``proxy``: one prefill per image
   record, then one token per probe setting).
3. **Baseline** through ONNX Runtime: the default's export generates every selection and report
   record with the correction off (the uncorrected model, text and image) and on (image).
4. **Search**: every candidate (``operating_point.candidate_grid``) is scored on the selection
   part's image records by its refusal log-odds at the first reply token (``proxy``), a
   decision being "log-odds above a threshold fitted on the baseline's generated replies".
5. **Confirm** the best few by the rule on those scores: each is exported and generates the
   selection and report records through ONNX Runtime; the proxy's agreement with the generated
   refusals is measured on them.
6. **Choose** by the rule (``operating_point.RULE``) on the confirmed selection figures, and report
   the choice's figures on the report part, which neither the fit nor the choice read.

Writes DIR/directions.safetensors (the fit with the chosen options: ``export MODEL --directions
DIR`` uses them with no flags), DIR/tune.json (docs/FORMATS.md) and DIR/frontier.png.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ArtifactError, DataError, RegapError
from ..options import MODES
from . import operating_point as op

TUNE_FILENAME = "tune.json"
PLOT_FILENAME = "frontier.png"
FORMAT_VERSION = "1"
DEFAULT_BUDGET_POINTS = 3.0
DEFAULT_CONFIRM = 3
DEFAULT_SEARCH_BATCH = 32
# The proxy's refusal-start tokens: behaviour's phrases as a reply's first word, with and without
# the space most tokenizers put before it ("I" and " I" are different tokens).
LEADING_SPACE = " "


@dataclass
class Reply:
    text: str
    refused: bool
    log_odds: float


# ------------------------------------------------------------------------------- inputs
def tune_records(data: Sequence[Path], *, split: str | None, label: str | None, render: bool, renderer,
                 limit: int | None) -> tuple[list, str]:
    """The records (text and image twins) and a name for where they came from."""
    from ..data import load_bundled, to_multimodal_pairs
    from ..data.benchmarks import load_data_files
    from .evaluate import _limited

    if not data:
        records, source = load_bundled(split or "train"), f"the bundled set ({split or 'train'} split)"
    else:
        records, sources = load_data_files(data, split, label=label)
        source = ", ".join(sources)
    seen: dict[str, Any] = {}
    for r in records:
        if r.id in seen:
            raise DataError(f"record id {r.id!r} appears twice (also at {seen[r.id].where()})", path=r.source,
                            line=r.line, field="id", hint="give every record of the --data files its own id")
        seen[r.id] = r
    missing = {"harmful", "harmless"} - {r.label for r in records}
    if missing:
        raise DataError(f"tune needs harmful and harmless records; there is no {' or '.join(sorted(missing))} record"
                        + (f" in split {split!r}" if split else ""), path=source,
                        hint="add the other label (e.g. another --data file)")
    if render:
        records = to_multimodal_pairs(records, **({} if renderer is None else {"renderer": renderer}))
    if limit is not None:
        if limit < 1:
            raise RegapError(f"--limit must be at least 1, got {limit}")
        records = _limited(records, limit)
    return records, source


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes to search, in MODES' order; the default's mode (regap) is always searched."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise RegapError(f"--modes takes a comma-separated list of {', '.join(MODES)}, got {','.join(modes) or 'nothing'}")
    if "regap" not in modes:
        raise RegapError("--modes must include regap: the default options (mode regap) are the baseline every "
                         "candidate is compared with", hint="e.g. --modes regap,fixed")
    return tuple(m for m in MODES if m in modes)


def check_budget(points: float) -> None:
    if not (isinstance(points, (int, float)) and math.isfinite(points) and 0 <= points <= 100):
        raise RegapError(f"--over-refusal-budget must be a number of percentage points in [0, 100], got {points}")


# ----------------------------------------------------------------------------- fitting
@dataclass
class Fit:
    """The fitting part's directions: rhat, drift and text anchors once; the gate per probe setting."""

    rhat: Any
    drift: Any
    a_pos: Any
    a_neg: Any
    gate_rows: dict                 # probe key -> {"M+": rows, "M-": rows}
    reads: dict                     # probe key -> discriminant rows [L, H]
    records: list
    directions: dict               # (probe key, read, tau) -> Directions

    def of(self, candidate: op.Candidate):
        from ..calibration.directions import fitted_directions

        o = candidate.options
        key = (candidate.probe_key, candidate.gate_read, o.tau)
        if key not in self.directions:
            read = self.reads.get(candidate.probe_key) if candidate.gate_read == "discriminant" else None
            self.directions[key] = fitted_directions(self.rhat, self.drift, self.a_pos, self.a_neg,
                                                     self.gate_rows[candidate.probe_key], o.tau, read)
        return self.directions[key]


def fit(loaded, records: list, candidates: Sequence[op.Candidate], *, batch_size: int, show_progress: bool,
        search_batch_size: int | None = None) -> Fit:
    """calibrate's fit on ``records``, then the probe rows (image records, block outputs at the last
    prompt token with the probe band's correction on) of every probe setting the candidates use
    (``search_batch_size`` records per prefill, default ``batch_size``)."""
    import torch

    from ..calibration.directions import (discriminant_read, drift_direction, refusal_direction,
                                          require_classes)
    from ..calibration.fit import (capture_statistics, probe_pass, provisional_directions,
                                   require_text_classes)
    from ..calibration.capture import requests_for
    from ..io.progress import progress_bar
    from ..method.folding import probe_only
    from ..options import RegapOptions
    from . import proxy
    from .evaluate import _batches

    require_text_classes(records)
    stats = capture_statistics(loaded, records, RegapOptions(), batch_size=batch_size, show_progress=show_progress)
    require_classes(stats, ("T+", "T-", "M+", "M-"), why="tune's fit")
    rhat, a_pos, a_neg = refusal_direction(stats)
    drift = drift_direction(stats, rhat, "full")
    provisional = provisional_directions(rhat, drift, a_pos, a_neg)
    by_key: dict[tuple, op.Candidate] = {}
    for c in candidates:
        by_key.setdefault(c.probe_key, c)
    image = [r for r in records if r.modality == "image"]
    classes = [r.class_key for r in image]
    num_layers = rhat.shape[0]
    rows = {key: torch.empty((len(image), num_layers, rhat.shape[1]), dtype=torch.float64) for key in by_key}
    last_keys = [key for key, c in by_key.items() if c.options.positions == proxy.LAST]
    scheme = proxy.position_scheme_of(loaded)
    batches = _batches(image, loaded.adapter, loaded.processor, search_batch_size or batch_size)
    work = [(b, key) for b in range(len(batches)) for key in last_keys]
    current, prefixed = -1, None
    offsets = np.cumsum([0] + [len(b.records) for b in batches])
    for b, key in progress_bar(work, description="fit: probe settings", enabled=show_progress):
        if b != current:
            current, prefixed = b, proxy.prefill(loaded, scheme, batches[b])
        opts = by_key[key].options
        _, states = proxy.last_token(loaded, prefixed, probe_only(provisional, opts),
                                     read_layers=range(num_layers))
        start = offsets[b]
        rows[key][start:start + len(prefixed)] = torch.stack([states[layer] for layer in range(num_layers)], dim=1)
    requests = requests_for(image, loaded.adapter, loaded.processor)
    for key, c in by_key.items():
        if key in last_keys:
            continue
        stats_key = probe_pass(loaded, provisional, c.options, requests, batch_size=batch_size,
                               show_progress=show_progress)
        rows[key] = stats_key.rows
    gate_rows = {key: {k: value[[i for i, c in enumerate(classes) if c == k]] for k in ("M+", "M-")}
                 for key, value in rows.items()}
    reads = {}
    if any(c.gate_read == "discriminant" for c in candidates):
        reads = {key: discriminant_read(g["M+"], g["M-"]) for key, g in gate_rows.items()}
    return Fit(rhat, drift, a_pos, a_neg, gate_rows, reads, records, {})


def directions_file(loaded, fitted: Fit, candidate: op.Candidate):
    from ..calibration.directions_io import DirectionsFile
    from ..calibration.fit import calibration_sha256
    from ..models.weight_sample import weight_sample_json

    return DirectionsFile(fitted.of(candidate), candidate.options, loaded.fingerprint,
                          calibration_sha256(fitted.records), loaded.source, weight_sample_json(loaded.model))


# ------------------------------------------------------------------------------ the proxy
def refusal_start_ids(tokenizer) -> list[int]:
    from .behaviour import DEFAULT_REFUSAL_STARTS, refusal_start_token_ids

    starts = DEFAULT_REFUSAL_STARTS + tuple(LEADING_SPACE + s for s in DEFAULT_REFUSAL_STARTS)
    return refusal_start_token_ids(tokenizer, starts)


def proxy_scores(loaded, fitted: Fit, candidates: Sequence[op.Candidate], records: list, refusal_ids: Sequence[int],
                 *, batch_size: int, show_progress: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Log-odds [candidates, image records] of a refusal at the first reply token; a candidate whose
    constants cannot be folded (its anchors coincide) gets NaN and a reason."""
    from ..io.progress import progress_bar
    from ..method.folding import fold, score_readout, sequence_alpha
    from . import proxy
    from .behaviour import refusal_log_odds
    from .evaluate import _batches

    image = [r for r in records if r.modality == "image"]
    folded: dict[int, Any] = {}
    failed: dict[int, str] = {}
    for i, c in enumerate(candidates):
        try:
            directions = fitted.of(c)
            folded[i] = (fold(directions, c.options),
                         score_readout(directions, c.options) if c.options.mode == "regap-seq" else None)
        except ArtifactError as exc:
            failed[i] = str(exc)
    scores = np.full((len(candidates), len(image)), np.nan)
    scheme = proxy.position_scheme_of(loaded)
    batches = _batches(image, loaded.adapter, loaded.processor, batch_size)
    offsets = np.cumsum([0] + [len(b.records) for b in batches])
    work = [(b, i) for b in range(len(batches)) for i in folded]
    current, prefixed, seq_scores = -1, None, {}
    for b, i in progress_bar(work, description=f"search: {len(folded)} candidates", enabled=show_progress):
        if b != current:
            current, prefixed, seq_scores = b, proxy.prefill(loaded, scheme, batches[b]), {}
        c = candidates[i]
        corrections, readout = folded[i]
        alpha = None
        if readout is not None:
            # regap-seq: the probe pass (alpha0 on both bands, read at l_s) is shared by the
            # candidates that differ only in tau, sharpness and alpha_max.
            key = (c.probe_key, c.gate_read)
            if key not in seq_scores:
                probe = np.full(len(prefixed), c.options.alpha0)
                _, states = proxy.last_token(loaded, prefixed, corrections, positions=c.options.positions,
                                             alpha=probe, stop_after=readout.layer)
                seq_scores[key] = (states[readout.layer] @ readout.w.double() + readout.b).numpy()
            alpha = sequence_alpha(seq_scores[key], readout.kappa, c.options)
        logits, _ = proxy.last_token(loaded, prefixed, corrections, positions=c.options.positions, alpha=alpha)
        scores[i, offsets[b]:offsets[b + 1]] = refusal_log_odds(logits, refusal_ids)
    return scores, failed


# ------------------------------------------------------------------------- generation
class Generator:
    """Greedy replies through ONNX Runtime on exported folders, keyword-judged (evaluate's engine)."""

    def __init__(self, loaded, records: list, *, max_new_tokens: int, batch_size: int, markers: Sequence[str],
                 refusal_ids: Sequence[int], show_progress: bool):
        from ..models.base import tokenizer_of
        from .evaluate import _batches, _eos_ids

        self.batches = _batches(records, loaded.adapter, loaded.processor, batch_size)
        self.tokenizer = tokenizer_of(loaded.processor)
        self.eos = _eos_ids(loaded)
        self.max_new_tokens = max_new_tokens
        self.markers = tuple(markers)
        self.refusal_ids = list(refusal_ids)
        self.show_progress = show_progress

    def replies(self, folder: Path, *, correct: bool, modality: str, description: str) -> dict[str, Reply]:
        from ..io.progress import progress_bar
        from .behaviour import is_refusal, refusal_log_odds
        from .evaluate import OrtEngine, _until_eos

        engine = OrtEngine(Path(folder))
        batches = [b for b in self.batches if b.records[0].modality == modality]
        out: dict[str, Reply] = {}
        for batch in progress_bar(batches, description=description, total_items=sum(len(b.records) for b in batches),
                                  enabled=self.show_progress):
            tokens, first_logits, _ = engine.generate(batch, self.max_new_tokens, correct=correct)
            odds = refusal_log_odds(first_logits, self.refusal_ids)
            for row, record in enumerate(batch.records):
                kept = tokens[row, :_until_eos(tokens[row], self.eos)].tolist()
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                out[record.id] = Reply(text, is_refusal(text, self.markers), float(odds[row]))
        return out


def export_candidate(model: str, loaded, fitted: Fit, candidate: op.Candidate, scratch: Path, name: str) -> Path:
    """An ONNX export of ``candidate`` in ``scratch`` (the directions it would write, then export)."""
    from ..calibration.directions_io import save_directions
    from ..export.pipeline import export_to_folder

    import logging

    from ..export import client_files

    folder = scratch / f"{name}-directions"
    folder.mkdir()
    save_directions(folder, directions_file(loaded, fitted, candidate))
    # What each client can run is export's message to its user; these folders are tune's scratch.
    notes = logging.getLogger(client_files.__name__)
    level = notes.level
    notes.setLevel(logging.ERROR)
    try:
        return export_to_folder(model, folder, scratch / name, formats=("onnx",))
    finally:
        notes.setLevel(level)


# ------------------------------------------------------------------------------ the run
def tune_to_folder(model: str | None, out_dir: Path, data: Sequence[Path] = (), *, split: str | None = None,
                   label: str | None = None, render: bool = True, limit: int | None = None,
                   over_refusal_budget: float = DEFAULT_BUDGET_POINTS, shares: Sequence[float] = op.DEFAULT_SHARES,
                   seed: int = 0, group_by: str = "pair", confirm: int = DEFAULT_CONFIRM, max_new_tokens: int = 32,
                   batch_size: int = 8, markers: Sequence[str] | None = None, plot: bool = True,
                   force: bool = False, show_progress: bool = True, echo: Callable[[str], None] | None = None,
                   candidates: Sequence[op.Candidate] | None = None, modes: Sequence[str] = MODES,
                   search_batch_size: int = DEFAULT_SEARCH_BATCH) -> dict[str, Any]:
    """tune MODEL --data FILE --out DIR: choose the options by the rule, write the directions with
    them, tune.json and frontier.png. Returns tune.json's content. ``over_refusal_budget`` is in
    percentage points. ``search_batch_size``: image records per prefill of the search (a candidate
    costs one token per record there, so larger batches amortize each forward). ``candidates``: the
    search space (default ``operating_point.candidate_grid``; the default options are always among
    them, first). ``modes``: the modes searched (a client that cannot run the probe pass, such as
    transformers.js or ONNX Runtime GenAI, runs ``regap`` and ``fixed`` only)."""
    from ..calibration.report import json_safe
    from ..data.render import declared_renderer
    from ..io.atomic import atomic_output_dir, check_output_dir
    from ..models.base import tokenizer_of
    from ..models.loading import load_model, resolve_source
    from .behaviour import DEFAULT_REFUSAL_MARKERS

    say = echo or (lambda _line: None)
    out_dir = Path(out_dir)
    inputs = [*[Path(p) for p in data], model]
    check_output_dir(out_dir, force=force, inputs=inputs)
    check_budget(over_refusal_budget)
    if confirm < 1:
        raise RegapError(f"--confirm must be at least 1, got {confirm}")
    if search_batch_size < 1:
        raise RegapError(f"--search-batch-size must be at least 1, got {search_batch_size}")
    if max_new_tokens < 1:
        raise RegapError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    modes = check_modes(modes)
    budget = over_refusal_budget / 100
    markers = tuple(markers) if markers is not None else DEFAULT_REFUSAL_MARKERS
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    # The data first: a bad file is refused before the model loads.
    _, folder = resolve_source(model)
    renderer = declared_renderer(folder)
    records, source = tune_records(data, split=split, label=label, render=render, renderer=renderer, limit=limit)
    parts = op.split_records(records, shares=shares, seed=seed, group_by=group_by, source=source)
    loaded = load_model(model)
    if not loaded.adapter.multimodal:
        raise RegapError(f"{loaded.source} is a text-only model ({loaded.adapter.family}); the correction acts on image "
                         "inputs only, so there is nothing to tune", hint="tune a multimodal model, or calibrate this one")
    num_layers = loaded.adapter.num_layers(loaded.model)
    default = op.default_candidate(num_layers)
    candidates = [default] + [c for c in (candidates if candidates is not None else op.candidate_grid(num_layers))
                              if c != default and c.options.mode in modes]
    counts = parts.counts()
    say(f"tune {loaded.source} ({num_layers} layers) on {len(records)} records of {source}: "
        + ", ".join(f"{name} {sum(counts[name].values())}" for name in op.PARTS)
        + f" (split by {group_by}s, seed {seed})")
    say(f"rule, fixed before any figure is read: {op.rule_text(budget)}")
    lap("prepare")

    fitted = fit(loaded, parts.fit, candidates, batch_size=batch_size, show_progress=show_progress,
                 search_batch_size=search_batch_size)
    lap("fit")
    say(f"fit: directions on the fitting part, the gate for {len(fitted.gate_rows)} probe settings "
        f"({seconds['fit']:.0f} s)")

    tokenizer = tokenizer_of(loaded.processor)
    refusal_ids = refusal_start_ids(tokenizer)
    scored = [r for r in parts.select + parts.report]
    generator = Generator(loaded, scored, max_new_tokens=max_new_tokens, batch_size=batch_size, markers=markers,
                          refusal_ids=refusal_ids, show_progress=show_progress)
    image_select = [r for r in parts.select if r.modality == "image"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Named as io.atomic names its partial folders, so that a run killed here leaves nothing that
    # the next run writing the same --out does not remove.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-tune", dir=out_dir.parent))
    try:
        model_name = model if model is not None else loaded.source
        say("baseline: the default's export, replies with the correction off and on (ONNX Runtime)")
        folder0 = export_candidate(model_name, loaded, fitted, default, scratch, "default")
        text_off = generator.replies(folder0, correct=False, modality="text", description="text (off)")
        image_off = generator.replies(folder0, correct=False, modality="image", description="image (off)")
        confirmed = {0: generator.replies(folder0, correct=True, modality="image", description="image (default)")}
        text_on = {0: generator.replies(folder0, correct=True, modality="text", description="text (default)")}
        shutil.rmtree(folder0, ignore_errors=True)
        lap("baseline")

        calibration_rows = ([(text_off[r.id].log_odds, text_off[r.id].refused) for r in parts.select if r.modality == "text"]
                            + [(image_off[r.id].log_odds, image_off[r.id].refused) for r in image_select]
                            + [(confirmed[0][r.id].log_odds, confirmed[0][r.id].refused) for r in image_select])
        threshold = op.fit_threshold(*zip(*calibration_rows))
        scores, failed = proxy_scores(loaded, fitted, candidates, parts.select, refusal_ids,
                                      batch_size=search_batch_size, show_progress=show_progress)
        lap("search")

        text_rates = {part: _text_rates(text_off, parts.part(part)) for part in ("select", "report")}
        labels = np.array([r.label for r in image_select])
        proxy_decisions = scores > threshold
        proxy_judged = [op.Judged(int(proxy_decisions[i][labels == "harmful"].sum()),
                                  int(proxy_decisions[i][labels == "harmless"].sum()), int((labels == "harmless").sum()),
                                  i not in failed and c.options.positions != "all", c.simplicity(default))
                        for i, c in enumerate(candidates)]
        order = [i for i in op.ranked(proxy_judged, text_harmless_rate=text_rates["select"]["harmless"]["rate"],
                                      budget=budget) if i not in failed]
        finalists = [i for i in order if i != 0][:confirm]
        say(f"search: {len(candidates) - len(failed)} candidates scored by the proxy; confirming {len(finalists)} "
            f"and the default through ONNX Runtime")
        for rank, i in enumerate(finalists, start=1):
            folder_i = export_candidate(model_name, loaded, fitted, candidates[i], scratch, f"finalist-{rank}")
            confirmed[i] = generator.replies(folder_i, correct=True, modality="image",
                                             description=f"image (finalist {rank}/{len(finalists)})")
            text_on[i] = generator.replies(folder_i, correct=True, modality="text",
                                           description=f"text (finalist {rank}/{len(finalists)})")
            shutil.rmtree(folder_i, ignore_errors=True)
        lap("confirm")

        report = _report(loaded, source, records, parts, candidates, default, fitted, scores, failed, threshold,
                         proxy_decisions, confirmed, text_off, text_on, image_off, text_rates, budget,
                         over_refusal_budget, refusal_ids, tokenizer, markers, max_new_tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    chosen = candidates[report["chosen"]["index"]]
    bundle = directions_file(loaded, fitted, chosen)
    seconds["total"] = round(time.perf_counter() - started, 1)
    report["seconds"] = seconds
    report = json_safe(report)
    with atomic_output_dir(out_dir, force=force, inputs=[*inputs, loaded.folder]) as tmp:
        from ..calibration.directions_io import save_directions
        from ..io.checks import check_tensors_finite

        check_tensors_finite(bundle.directions.tensors(), path=out_dir, what="the chosen directions'",
                             hint="the fitting part gives a degenerate fit; nothing was written")
        save_directions(tmp, bundle)
        (tmp / TUNE_FILENAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        if plot:
            write_plot(tmp / PLOT_FILENAME, report)
    return report


def _text_rates(text_off: dict[str, Reply], records: list) -> dict[str, dict[str, Any]]:
    out = {}
    for label in ("harmful", "harmless"):
        decisions = [text_off[r.id].refused for r in records if r.modality == "text" and r.label == label]
        out[label] = op.refusal_figures(decisions)
    return out


def _image_figures(decisions: dict[str, bool], records: list, default: dict[str, bool] | None = None
                   ) -> dict[str, Any]:
    """Harmful and harmless image refusal figures on ``records`` (vs the default's when given)."""
    out = {}
    for label in ("harmful", "harmless"):
        ids = [r.id for r in records if r.modality == "image" and r.label == label]
        out[label] = op.refusal_figures([decisions[i] for i in ids],
                                        None if default is None else [default[i] for i in ids])
    return out


def gap_closed(text_harmful: float, image_off: float, image_on: float) -> float | None:
    """The share of the text-image refusal gap on harmful requests that the correction closes."""
    gap = text_harmful - image_off
    return None if gap <= 0 else (image_on - image_off) / gap


def _report(loaded, source, records, parts, candidates, default, fitted, scores, failed, threshold, proxy_decisions,
            confirmed, text_off, text_on, image_off, text_rates, budget, budget_points, refusal_ids, tokenizer, markers,
            max_new_tokens) -> dict[str, Any]:
    image_select = [r for r in parts.select if r.modality == "image"]
    image_report = [r for r in parts.report if r.modality == "image"]
    select_index = {r.id: k for k, r in enumerate(image_select)}
    default_proxy = {r.id: bool(proxy_decisions[0][k]) for k, r in enumerate(image_select)}
    text_select = [r for r in parts.select if r.modality == "text"]
    text_report = [r for r in parts.report if r.modality == "text"]
    rows = []
    for i, c in enumerate(candidates):
        row: dict[str, Any] = {**c.to_json(), "changes": c.changes(default), "described": c.described(default)}
        if i in failed:
            row["proxy"] = None
            row["skipped"] = failed[i]
        else:
            decided = {r.id: bool(proxy_decisions[i][select_index[r.id]]) for r in image_select}
            row["proxy"] = _image_figures(decided, image_select, default_proxy)
            row["proxy"]["mean_log_odds"] = {label: float(np.mean([scores[i][select_index[r.id]] for r in image_select
                                                                   if r.label == label]))
                                             for label in ("harmful", "harmless")}
        if i in confirmed:
            generated = {rid: reply.refused for rid, reply in confirmed[i].items()}
            base = {rid: reply.refused for rid, reply in confirmed[0].items()}
            row["confirmed"] = {
                "select": _image_figures(generated, image_select, base),
                "report": _image_figures(generated, image_report, base),
                "text_identical": {part: all(text_on[i][r.id].text == text_off[r.id].text for r in recs)
                                   for part, recs in (("select", text_select), ("report", text_report))},
                "proxy_quality": op.proxy_quality([scores[i][select_index[r.id]] for r in image_select],
                                                  [generated[r.id] for r in image_select], threshold),
                "refused_ids": sorted(rid for rid, refused in generated.items() if refused),
            }
        rows.append(row)
    judged = {i: op.Judged(rows[i]["confirmed"]["select"]["harmful"]["refused"],
                           rows[i]["confirmed"]["select"]["harmless"]["refused"],
                           rows[i]["confirmed"]["select"]["harmless"]["n"],
                           rows[i]["confirmed"]["text_identical"]["select"], candidates[i].simplicity(default))
              for i in confirmed}
    keys = sorted(judged)
    pick, met = op.choose([judged[i] for i in keys], text_harmless_rate=text_rates["select"]["harmless"]["rate"],
                          budget=budget)
    chosen = keys[pick]
    all_generated = [(rows[i]["confirmed"]["proxy_quality"], i) for i in confirmed]
    pooled_scores, pooled_refused = [], []
    for i in confirmed:
        pooled_scores += [scores[i][select_index[r.id]] for r in image_select]
        pooled_refused += [confirmed[i][r.id].refused for r in image_select]
    off_report = {r.id: image_off[r.id].refused for r in image_report}
    chosen_report = rows[chosen]["confirmed"]["report"]
    default_report = rows[0]["confirmed"]["report"]
    text_harmful_report = text_rates["report"]["harmful"]["rate"]
    off_figures = _image_figures(off_report, image_report)

    def held_out(figures: dict[str, Any]) -> dict[str, Any]:
        return {"image": figures, "gap_closed": gap_closed(text_harmful_report, off_figures["harmful"]["rate"],
                                                           figures["harmful"]["rate"]),
                "over_refusal_vs_text_points": 100 * (figures["harmless"]["rate"]
                                                      - text_rates["report"]["harmless"]["rate"])}

    return {
        "format_version": FORMAT_VERSION,
        "model": {"source": loaded.source, "family": loaded.adapter.family,
                  "num_layers": loaded.adapter.num_layers(loaded.model), "fingerprint": loaded.fingerprint},
        "data": source,
        "modes": [m for m in MODES if any(c.options.mode == m for c in candidates)],
        "split": {"group_by": parts.group_by, "seed": parts.seed, "shares": list(parts.shares),
                  "counts": parts.counts(), "ids": {name: [r.id for r in parts.part(name)] for name in op.PARTS}},
        "rule": {"text": op.rule_text(budget), "fallback": op.FALLBACK_RULE, "over_refusal_budget_points": budget_points,
                 "applied_to": "the confirmed candidates' generated replies on the selection part"},
        "honesty": ("held-out part: the report figures come from the report part's records, which neither the fit "
                    "nor the choice read"),
        "generation": {"runtime": "onnxruntime", "max_new_tokens": max_new_tokens, "markers": list(markers)},
        "proxy": {"what": "refusal log-odds at the first reply token, the correction on, one token's forward per "
                          "image record per candidate over an uncorrected prefill of the rest of the prompt",
                  "refusal_start_tokens": [tokenizer.convert_ids_to_tokens(t) for t in refusal_ids],
                  "threshold": threshold,
                  "threshold_fitted_on": "the selection part's generated replies: text and image uncorrected, "
                                         "image with the default's correction",
                  "quality": op.proxy_quality(pooled_scores, pooled_refused, threshold),
                  "quality_per_candidate": {candidates[i].name: q for q, i in all_generated}},
        "text": {part: text_rates[part] for part in ("select", "report")},
        "image_off": {"select": _image_figures({r.id: image_off[r.id].refused for r in image_select}, image_select),
                      "report": off_figures},
        "candidates": rows,
        "default": {"index": 0, "name": default.name, "report": held_out(default_report)},
        "chosen": {"index": chosen, "name": candidates[chosen].name,
                   "described": candidates[chosen].described(default), "within_budget": met,
                   "options": json.loads(candidates[chosen].options.to_json()),
                   "gate_read": candidates[chosen].gate_read,
                   "select": rows[chosen]["confirmed"]["select"], "report": held_out(chosen_report),
                   "text_identical": rows[chosen]["confirmed"]["text_identical"]},
    }


# ------------------------------------------------------------------------------ output
def _rate(fig: dict[str, Any]) -> str:
    from .proportions import format_rate

    return format_rate(fig["rate"], fig["ci95"])


def summary_lines(report: dict[str, Any], out_dir: Path | None = None) -> list[str]:
    """The one-screen summary of a tune.json."""
    counts = report["split"]["counts"]
    chosen, default = report["chosen"], report["default"]
    confirmed = [c for c in report["candidates"] if c.get("confirmed")]
    scored = sum(c.get("proxy") is not None for c in report["candidates"])
    quality = report["proxy"]["quality"]
    text = report["text"]["report"]
    off = report["image_off"]["report"]
    ch, de = chosen["report"], default["report"]

    def vs(fig: dict[str, Any]) -> str:
        v = fig.get("vs_default")
        if not v:
            return ""
        return f"; vs default +{v['refused_only_candidate']} -{v['refused_only_default']}, McNemar p {v['mcnemar_p']:.2g}"

    def closed(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f} %"

    auroc = "-" if quality["auroc"] is None else f"{quality['auroc']:.3f}"
    lines = [
        f"tune {report['model']['source']} ({report['model']['num_layers']} layers), {report['data']}: "
        + ", ".join(f"{name} {sum(counts[name].values())}" for name in op.PARTS) + f" records (split by {report['split']['group_by']}s)",
        f"rule: {report['rule']['text']}",
        f"searched {scored} candidates ({', '.join(report['modes'])}) by the proxy (first-token refusal "
        f"log-odds); confirmed {len(confirmed)} through "
        f"ONNX Runtime; proxy vs generated refusal on them: AUROC {auroc}, agreement "
        f"{100 * quality['agreement']:.0f} % ({quality['n']} replies)",
        f"chosen: {chosen['described']}" + ("" if chosen["within_budget"] else "  [NO candidate met the budget]"),
        f"  selection part: image harmful {_rate(chosen['select']['harmful'])}, harmless "
        f"{_rate(chosen['select']['harmless'])} (text harmless {_rate(report['text']['select']['harmless'])})",
        f"held-out report part ({counts['report']['M+']} + {counts['report']['M-']} image requests, never fitted or "
        "selected on; ONNX Runtime, greedy):",
        f"  text path:        harmful {_rate(text['harmful'])}, harmless {_rate(text['harmless'])}",
        f"  image uncorrected: harmful {_rate(off['harmful'])}, harmless {_rate(off['harmless'])}",
        f"  image, chosen:     harmful {_rate(ch['image']['harmful'])}{vs(ch['image']['harmful'])}",
        f"                     harmless {_rate(ch['image']['harmless'])}{vs(ch['image']['harmless'])}",
        f"  image, default:    harmful {_rate(de['image']['harmful'])}, harmless {_rate(de['image']['harmless'])}",
        f"  gap closed: chosen {closed(ch['gap_closed'])}, default {closed(de['gap_closed'])}; harmless image refusal "
        f"above text: chosen {ch['over_refusal_vs_text_points']:+.1f} points; text replies identical: "
        f"{'yes' if all(chosen['text_identical'].values()) else 'NO'}",
    ]
    if "seconds" in report:
        lines.append(f"took {report['seconds']['total']:.0f} s ("
                     + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k != "total") + ")")
    if out_dir is not None:
        lines.append(f"wrote {Path(out_dir) / 'directions.safetensors'} (`regap-export export MODEL --directions "
                     f"{out_dir}` uses the chosen options), {TUNE_FILENAME}, {PLOT_FILENAME}")
    return lines


def write_plot(path: Path, report: dict[str, Any]) -> Path | None:
    """Corrected image refusal, harmful against harmless, on the selection part: every candidate by
    the proxy, the confirmed ones as generated, the budget line and the chosen point."""
    from ..calibration.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    proxy = [c["proxy"] for c in report["candidates"] if c.get("proxy")]
    ax.scatter([100 * p["harmless"]["rate"] for p in proxy], [100 * p["harmful"]["rate"] for p in proxy], s=10,
               color="lightgray", label="candidates (proxy)")
    confirmed = [c for c in report["candidates"] if c.get("confirmed")]
    ax.scatter([100 * c["confirmed"]["select"]["harmless"]["rate"] for c in confirmed],
               [100 * c["confirmed"]["select"]["harmful"]["rate"] for c in confirmed], s=40, color="tab:blue",
               label="confirmed (generated)")
    text_harmless = report["text"]["select"]["harmless"]["rate"]
    budget = text_harmless + report["rule"]["over_refusal_budget_points"] / 100
    ax.axvline(100 * budget, color="tab:red", linestyle="--", label=f"budget: text + {report['rule']['over_refusal_budget_points']:g} points")
    chosen = report["candidates"][report["chosen"]["index"]]["confirmed"]["select"]
    default = report["candidates"][0]["confirmed"]["select"]
    ax.scatter([100 * default["harmless"]["rate"]], [100 * default["harmful"]["rate"]], marker="s", s=70,
               facecolors="none", edgecolors="black", label="default")
    ax.scatter([100 * chosen["harmless"]["rate"]], [100 * chosen["harmful"]["rate"]], marker="*", s=220,
               color="tab:orange", label="chosen")
    ax.axhline(100 * report["text"]["select"]["harmful"]["rate"], color="gray", linestyle=":",
               label="text path, harmful")
    ax.set_xlabel("harmless image requests refused (%)")
    ax.set_ylabel("harmful image requests refused (%)")
    ax.set_xlim(left=-2)
    ax.set_ylim(-2, 102)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"tune on {report['model']['source']}: selection part, correction on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
