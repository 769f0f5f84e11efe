"""`regap-export evaluate`: behaviour before vs after correction (METHOD section 4).

For every record (text) and its image twin (typographic, or the record's own image), greedy
generation runs twice on the same exported model: correction off (image mask 0, exactly the
unmodified model) and on (the mask the runtime computes). Per modality and label it reports
the refusal rate (keyword markers), the first-token refusal log-odds, the share of greedy
outputs left identical, and the mean KL(off || on) of the next-token distributions over the
first ``kl_positions`` generated positions (teacher-forced on the uncorrected continuation).
It also measures the geometry at the read layer l_s with the correction off and on: d' and
AUROC along rhat per modality, and the mean gap between image states and their text twins
along rhat. Generation runs on ONNX Runtime (the exported graphs) or PyTorch (the corrected
checkpoint); the geometry always on PyTorch (it needs hidden states).

Metrics are pure functions in ``regap_export.evaluation.behaviour``; this module runs the models and
writes ``evaluation.json`` (docs/FORMATS.md) and, with matplotlib, ``evaluation.png``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .behaviour import (DEFAULT_REFUSAL_MARKERS, Generation, kl_divergence, refusal_log_odds,
                        refusal_start_token_ids, summarize)
from ..errors import DataError, RegapError
from ..data.records import check_context
from ..io.atomic import write_json_atomic
from ..models.base import PIXEL_EXTRA_KEYS, pixel_inputs

RUNTIMES = ("onnxruntime", "pytorch")
EVALUATION_FILENAME = "evaluation.json"
PLOT_FILENAME = "evaluation.png"
FORMAT_VERSION = "1"


# ---------------------------------------------------------------------------------- data
def evaluation_records(data: Sequence[Path] = (), *, split: str | None = None, multimodal: bool = True,
                       render: bool = True, renderer: Callable | None = None) -> list:
    """Records of ``data`` files (JSONL/CSV/TXT, or an MM-SafetyBench / FigStep layout), or the
    bundled held-out split; text records get an image twin on multimodal models."""
    from ..data import load_bundled, to_multimodal_pairs
    from ..data.benchmarks import load_data_files
    from ..data.records import LABELLED_FILES_HINT

    if not data:
        records = load_bundled(split or "heldout")
        sources = ["the bundled set"]
    else:
        records, sources = load_data_files(data, split, label_hint=LABELLED_FILES_HINT)
    labels = {r.label for r in records}
    if labels != {"harmful", "harmless"}:
        missing = ({"harmful", "harmless"} - labels) or {"harmful", "harmless"}
        raise DataError(f"evaluate needs harmful and harmless records; no {' or '.join(sorted(missing))} "
                        f"record{'s' if split is None else ' in split ' + repr(split)}",
                        path=", ".join(sources), hint="add the other label (e.g. another --data file)")
    if not multimodal:
        return [r for r in records if r.modality == "text"]
    if render:
        kwargs = {} if renderer is None else {"renderer": renderer}
        records = to_multimodal_pairs(records, **kwargs)
    return records


# ------------------------------------------------------------------------------ engines
@dataclass
class Batch:
    records: list
    inputs: dict[str, np.ndarray]   # input_ids, attention_mask, pixel inputs (numpy)

    @property
    def ids(self) -> np.ndarray:
        return self.inputs["input_ids"]

    @property
    def pixels(self) -> dict[str, np.ndarray]:
        return pixel_inputs(self.inputs)


def _continued(batch: Batch, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of the prompt followed by ``tokens`` [batch, n]."""
    ids = np.concatenate([batch.ids, tokens], axis=1)
    mask = np.concatenate([batch.inputs["attention_mask"], np.ones_like(tokens)], axis=1)
    return ids, mask.astype(np.int64)


class OrtEngine:
    """Greedy generation and teacher-forced logits on the exported ONNX graphs."""

    def __init__(self, folder: Path, device: str = "cpu", *, verify_hashes: bool = True):
        from ..runtime.session import OrtSessions

        self.sessions = OrtSessions.open(folder, device=device, verify_hashes=verify_hashes)

    def generate(self, batch: Batch, max_new_tokens: int, correct: bool):
        from ..runtime.generate import generate

        result = generate(self.sessions, batch.ids, batch.inputs["attention_mask"], max_new_tokens=max_new_tokens,
                          correct=correct, **batch.pixels)
        return result.new_tokens, result.first_logits, result.regap_alpha

    def forced_logits(self, batch: Batch, tokens: np.ndarray, correct: bool, alpha: np.ndarray | None) -> np.ndarray:
        from ..runtime.generate import correction_masks

        s = self.sessions
        ids, mask = _continued(batch, tokens)
        position = s.positions.prefill(ids, mask, **batch.pixels)
        if s.image_channel:
            return self._forced_by_calls(batch, tokens, mask, position, correct, alpha)
        main = s.prompt_embeds(ids, **batch.pixels) if s.multimodal else ids
        image_mask, _ = correction_masks(s, ids, correct=correct, prompt_length=batch.ids.shape[1])
        out = s.run_decoder(main, mask, position, s.empty_past(ids.shape[0]), regap_alpha=alpha,
                            regap_image_mask=image_mask)
        return np.asarray(out.logits, dtype=np.float32)

    def _forced_by_calls(self, batch: Batch, tokens: np.ndarray, mask: np.ndarray, position: np.ndarray,
                         correct: bool, alpha: np.ndarray | None) -> np.ndarray:
        """A decoder with the modality channel corrects the last position of each call
        (``modality.call_mask``): the prompt in one call, then each forced token in its own, as the
        decode loop fed them."""
        from ..method.modality import clear_image_flags

        s, prompt = self.sessions, batch.ids.shape[1]
        main = s.prompt_embeds(batch.ids, **batch.pixels)
        if not correct:
            main = clear_image_flags(main)
        out = s.run_decoder(main, mask[:, :prompt], position[..., :prompt], s.empty_past(main.shape[0]),
                            regap_alpha=alpha)
        logits = [np.asarray(out.logits, dtype=np.float32)]
        for column in range(tokens.shape[1]):
            end = prompt + column + 1
            out = s.run_decoder(s.embed(tokens[:, column:column + 1]), mask[:, :end], position[..., end - 1:end],
                                out.presents, regap_alpha=alpha)
            logits.append(np.asarray(out.logits, dtype=np.float32))
        return np.concatenate(logits, axis=1)


class TorchEngine:
    """The same on the corrected safetensors checkpoint (``load_corrected``)."""

    def __init__(self, loaded, checkpoint):
        from ..models.positions import position_config, position_scheme

        self.loaded, self.checkpoint = loaded, checkpoint
        self.positions = position_scheme(position_config(loaded.adapter.family, loaded.model.config))
        self.image_token_id = loaded.adapter.image_token_id(loaded.model.config)

    def _masks(self, ids: np.ndarray, correct: bool, prompt_length: int | None = None):
        from ..method.modality import call_masks

        return call_masks(self.checkpoint.options.positions, ids, self.image_token_id, correct=correct,
                          prompt_length=prompt_length)

    def _tensors(self, batch: Batch, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        return torch_inputs(self.positions, batch, ids, mask)

    def _alpha(self, inputs: dict[str, Any], image_mask: np.ndarray):
        import torch

        from ..export.load import sequence_alpha

        if self.checkpoint.readout is None:
            return None
        return sequence_alpha(self.loaded, inputs, self.checkpoint, image_mask=torch.from_numpy(image_mask)).float()

    def generate(self, batch: Batch, max_new_tokens: int, correct: bool):
        import torch

        from ..models.base import cache_of, with_cache
        from ..runtime.decode import decode, extend_attention

        ids, mask = batch.ids, batch.inputs["attention_mask"].astype(np.int64)
        prompt, step_mask = self._masks(ids, correct)
        inputs = self._tensors(batch, ids, mask)
        alpha = self._alpha(inputs, prompt)
        extra = {} if alpha is None else {"regap_alpha": alpha}
        eos = _eos_ids(self.loaded)
        model = self.loaded.model
        with torch.no_grad():
            out = model(**inputs, **extra, regap_image_mask=torch.from_numpy(prompt), use_cache=True)
            first = out.logits[:, -1].float().numpy()
            position = inputs["position_ids"].numpy()
            attention = inputs["attention_mask"].numpy()

            def step(token: np.ndarray) -> np.ndarray:
                nonlocal out, position, attention
                attention = extend_attention(attention)
                position = self.positions.next(position)
                out = model(input_ids=torch.from_numpy(token[:, None]), attention_mask=torch.from_numpy(attention),
                            position_ids=torch.from_numpy(position), **with_cache(model, cache_of(out)),
                            use_cache=True, regap_image_mask=torch.from_numpy(step_mask), **extra)
                return out.logits[:, -1].float().numpy()

            tokens = decode(first, step, max_new_tokens=max_new_tokens, eos=eos, pad=self.pad_id(eos))
        return tokens, first, None if alpha is None else alpha.numpy()

    def pad_id(self, eos: list[int]) -> int:
        pad = self.loaded.model.generation_config.pad_token_id
        return int(pad) if pad is not None else (eos[0] if eos else 0)

    def forced_logits(self, batch: Batch, tokens: np.ndarray, correct: bool, alpha: np.ndarray | None) -> np.ndarray:
        import torch

        ids, mask = _continued(batch, tokens)
        prompt, _ = self._masks(ids, correct, prompt_length=batch.ids.shape[1])
        inputs = self._tensors(batch, ids, mask)
        extra = {} if alpha is None else {"regap_alpha": torch.from_numpy(np.asarray(alpha, np.float32))}
        with torch.no_grad():
            out = self.loaded.model(**inputs, **extra, regap_image_mask=torch.from_numpy(prompt), use_cache=False)
        return out.logits.float().numpy()


def torch_inputs(positions, batch: Batch, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """The PyTorch model's inputs for ``ids`` / ``mask`` (a batch's prompt, perhaps continued) with
    ``batch``'s pixels and explicit ``position_ids`` of the family's scheme ``positions``."""
    import torch

    extras = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask")}
    position = positions.prefill(ids, mask, **{k: v for k, v in extras.items() if k in PIXEL_EXTRA_KEYS
                                               or k == "mm_token_type_ids"})
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in extras.items() if k != "mm_token_type_ids"}
    out.update(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               position_ids=torch.from_numpy(position))
    return out


# --------------------------------------------------------------------------- evaluation
def _batches(records: list, adapter, processor, batch_size: int) -> list[Batch]:
    out = []
    for modality in ("text", "image"):
        group = [r for r in records if r.modality == modality]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            prompts = [adapter.render_prompt(processor, r.prompt_text, with_image=modality == "image") for r in chunk]
            images = [r.open_image() for r in chunk] if modality == "image" else None
            encoded = adapter.encode(processor, prompts, images)
            out.append(Batch(chunk, {k: v.numpy() for k, v in encoded.items()}))
    return out


def _until_eos(tokens: np.ndarray, eos: Sequence[int]) -> int:
    """Generated positions up to and including the first EOS."""
    for i, token in enumerate(tokens):
        if int(token) in eos:
            return i + 1
    return len(tokens)


def _generations(engine, batches: list[Batch], tokenizer, *, max_new_tokens: int, kl_positions: int,
                 eos: Sequence[int], refusal_ids: Sequence[int], show_progress: bool) -> list[Generation]:
    from ..io.progress import progress_bar

    out: list[Generation] = []
    for batch in progress_bar(batches, description="evaluate", total_items=sum(len(b.records) for b in batches),
                              enabled=show_progress):
        off, off_first, _ = engine.generate(batch, max_new_tokens, correct=False)
        on, on_first, alpha = engine.generate(batch, max_new_tokens, correct=True)
        n = min(kl_positions, off.shape[1])
        kl = np.zeros((off.shape[0], 0))
        if n > 0:
            prompt = batch.ids.shape[1]
            # Logits at positions prompt-1 .. prompt+n-2 predict the n generated tokens.
            # (A regap-seq graph needs some alpha even with the correction off; the mask zeroes it.)
            p = engine.forced_logits(batch, off[:, : n - 1], False, alpha)[:, prompt - 1: prompt - 1 + n]
            q = engine.forced_logits(batch, off[:, : n - 1], True, alpha)[:, prompt - 1: prompt - 1 + n]
            kl = kl_divergence(p, q)
        odds_off = refusal_log_odds(off_first, refusal_ids)
        odds_on = refusal_log_odds(on_first, refusal_ids)
        for row, record in enumerate(batch.records):
            keep_off, keep_on = _until_eos(off[row], eos), _until_eos(on[row], eos)
            tokens_off, tokens_on = off[row, :keep_off].tolist(), on[row, :keep_on].tolist()
            out.append(Generation(
                id=record.id, modality=record.modality, label=record.label,
                text_off=tokenizer.decode(tokens_off, skip_special_tokens=True).strip(),
                text_on=tokenizer.decode(tokens_on, skip_special_tokens=True).strip(),
                tokens_off=tokens_off, tokens_on=tokens_on,
                log_odds_off=float(odds_off[row]), log_odds_on=float(odds_on[row]),
                kl=[float(v) for v in kl[row, : min(n, keep_off)]],
                pair=record.pair if record.modality == "image" else None))
    return out


def _geometry(loaded, checkpoint, directions, records: list, *, batch_size: int, show_progress: bool
              ) -> dict[str, Any]:
    """Separability and the image-minus-text gap along rhat, correction off vs on, at every
    layer; ``read_layer`` (l_s) is where the summary reads them."""
    import torch

    from ..calibration.fit import separability_rows
    from ..calibration.capture import capture, requests_for
    from ..calibration.directions import projections

    requests = requests_for(records, loaded.adapter, loaded.processor)
    rhat = directions.rhat.double()
    midpoint = (directions.anchor_text_harmful.double() + directions.anchor_text_harmless.double()) / 2
    pairs = [(i, j) for i, r in enumerate(records) if r.modality == "image" and r.pair
             for j, t in enumerate(records) if t.id == r.pair and t.modality == "text"]
    result: dict[str, Any] = {"read_layer": checkpoint.options.read_layer, "pairs": len(pairs)}
    def sequence_alpha_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
        from ..export.load import sequence_alpha

        probe = {k: v for k, v in inputs.items() if k != "regap_image_mask"}
        return {"regap_alpha": sequence_alpha(loaded, probe, checkpoint,
                                              image_mask=inputs.get("regap_image_mask")).float()}

    # regap-seq: every forward needs its per-sequence alpha
    extra = sequence_alpha_inputs if checkpoint.readout is not None else None

    for state in ("off", "on"):
        stats = capture(loaded.model, loaded.adapter, loaded.processor, requests, batch_size=batch_size,
                        description=f"geometry ({state})", show_progress=show_progress,
                        correction_positions=checkpoint.options.positions, correction_off=state == "off",
                        extra_inputs=extra)
        rows = separability_rows(stats, rhat, midpoint)
        proj = projections(stats.rows, rhat)  # [N, L]
        if pairs:
            gap = torch.stack([proj[i] - proj[j] for i, j in pairs]).mean(0)
            for row, value in zip(rows, gap.tolist()):
                row["image_text_gap"] = value
        result[state] = rows
    return result


def _geometry_summary(geometry: dict[str, Any]) -> dict[str, Any]:
    layer = geometry["read_layer"]
    off, on = geometry["off"][layer], geometry["on"][layer]
    summary: dict[str, Any] = {"layer": layer}
    for key in ("dprime_T", "auroc_T", "dprime_M", "auroc_M", "image_text_gap"):
        summary[key] = {"off": off.get(key), "on": on.get(key)}
    gap_off, gap_on = off.get("image_text_gap"), on.get("image_text_gap")
    if gap_off not in (None, 0.0) and gap_on is not None:
        summary["gap_shrink"] = 1.0 - abs(gap_on) / abs(gap_off)
    return summary


def evaluate_folder(folder: Path, data: Sequence[Path] = (), *, split: str | None = None,
                    runtime: str = "onnxruntime", max_new_tokens: int = 32, kl_positions: int = 8,
                    markers: Sequence[str] | None = None, markers_file: Path | None = None, render: bool = True,
                    batch_size: int = 8, limit: int | None = None, device: str = "cpu", write: bool = True,
                    plot: bool = True, show_progress: bool = True, verify_hashes: bool = True) -> dict[str, Any]:
    """Evaluate an exported folder; returns (and writes) the evaluation report. The folder is
    verified first (``io.artifacts.ExportedFolder``; ``verify_hashes=False`` skips the sha256)."""
    from .behaviour import load_markers
    from ..data.render import declared_renderer
    from ..calibration.directions_io import load_directions
    from ..export.load import load_corrected, read_regap_checkpoint
    from ..io.artifacts import ExportedFolder
    from ..export.pipeline import DIRECTIONS_COPY
    from ..models.base import tokenizer_of

    folder = Path(folder)
    if runtime not in RUNTIMES:
        raise RegapError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    # Verified before anything in it is read, for either runtime (io.artifacts).
    exported = ExportedFolder.open(folder, verify_hashes=verify_hashes)
    manifest = exported.manifest
    needed = ("onnx", "safetensors") if runtime == "onnxruntime" else ("safetensors",)
    exported.require_formats(*needed, command=f"evaluate --runtime {runtime}")
    if limit is not None and limit < 1:
        raise RegapError(f"--limit must be at least 1, got {limit}")
    markers = tuple(markers) if markers is not None else (
        load_markers(markers_file) if markers_file is not None else DEFAULT_REFUSAL_MARKERS)
    start = time.perf_counter()
    # The data first: a bad file is refused before any model is loaded.
    records = evaluation_records(data, split=split, multimodal=bool(manifest["model"]["multimodal"]),
                                 render=render, renderer=declared_renderer(folder))
    if limit is not None:
        records = _limited(records, limit)
    checkpoint = read_regap_checkpoint(folder, verify_hashes=verify_hashes)
    loaded = load_corrected(folder, verify_hashes=verify_hashes)
    tokenizer = tokenizer_of(loaded.processor)
    batches = _batches(records, loaded.adapter, loaded.processor, batch_size)
    limit = loaded.adapter.context_length(loaded.model.config)
    for batch in batches:  # before any generation: an over-long record would take the memory
        check_context(zip(batch.records, batch.inputs["attention_mask"].sum(axis=1).tolist()), limit,
                      new_tokens=max_new_tokens)
    engine = (OrtEngine(folder, device, verify_hashes=verify_hashes) if runtime == "onnxruntime"
              else TorchEngine(loaded, checkpoint))
    eos = _eos_ids(loaded)
    generations = _generations(engine, batches, tokenizer, max_new_tokens=max_new_tokens,
                               kl_positions=kl_positions, eos=eos,
                               refusal_ids=refusal_start_token_ids(tokenizer), show_progress=show_progress)
    directions = load_directions(exported.path(DIRECTIONS_COPY)).directions
    geometry = _geometry(loaded, checkpoint, directions, records, batch_size=batch_size, show_progress=show_progress)
    report = {
        "format_version": FORMAT_VERSION,
        "folder": str(folder), "runtime": runtime, "device": device, "mode": checkpoint.options.mode,
        "options": json.loads(checkpoint.options.to_json()),
        "data": [str(p) for p in data] or ["bundled:" + (split or "heldout")],
        "max_new_tokens": max_new_tokens, "kl_positions": kl_positions,
        "behaviour": summarize(generations, markers),
        "geometry": {"read_layer": _geometry_summary(geometry), "layers": {"off": geometry["off"],
                                                                           "on": geometry["on"]}},
        "generations": [g.__dict__ for g in generations],
        "seconds": round(time.perf_counter() - start, 1),
    }
    from ..calibration.report import json_safe

    report = json_safe(report)
    if write:
        write_json_atomic(folder / EVALUATION_FILENAME, report)
        if plot:
            write_plot(folder / PLOT_FILENAME, report)
    return report


def _limited(records: list, limit: int) -> list:
    """The first ``limit`` records per label and modality, and the image twins of the kept
    text records (so pairs stay whole)."""
    by_id = {r.id: r for r in records}
    counts: dict[tuple[str, str], int] = {}
    kept: set[str] = set()
    for r in records:
        twin = by_id.get(r.pair) if r.pair else None
        if r.modality == "image" and twin is not None and twin.modality == "text":
            continue  # kept with its text record
        key = (r.modality, r.label)
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            kept.add(r.id)
            if twin is not None and twin.modality == "image":
                kept.add(twin.id)
    return [r for r in records if r.id in kept]


def _eos_ids(loaded) -> list[int]:
    generation = loaded.model.generation_config
    eos = generation.eos_token_id
    if eos is None:
        eos = loaded.adapter.text_config(loaded.model.config).eos_token_id
    return [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


def table_lines(report: dict[str, Any]) -> list[str]:
    """The human view: behaviour per cell, then the geometry at the read layer."""
    from .behaviour import format_table, format_uncertainty

    lines = [f"evaluate {report['folder']} ({report['runtime']}, mode {report['mode']}, "
             f"positions {report['options']['positions']})", format_table(report["behaviour"])]
    lines.append(format_uncertainty(report["behaviour"]))
    g = report["geometry"]["read_layer"]

    def pair(key: str, spec: str) -> str:
        off, on = g[key]["off"], g[key]["on"]
        fmt = (lambda v: "-" if v is None else format(v, spec))
        return f"{fmt(off)} -> {fmt(on)}"

    lines.append(f"geometry at layer {g['layer']} (off -> on): d' text {pair('dprime_T', '.2f')}, "
                 f"d' image {pair('dprime_M', '.2f')}, AUROC image {pair('auroc_M', '.3f')}, "
                 f"image-text gap along rhat {pair('image_text_gap', '.3f')}"
                 + (f" (shrinks {100 * g['gap_shrink']:.0f} %)" if g.get("gap_shrink") is not None else ""))
    return lines


def write_plot(path: Path, report: dict[str, Any]) -> Path | None:
    """Refusal off vs on per cell (with 95 % intervals), the image-text gap along rhat per layer,
    and the separability d' per layer: text, and image off vs on (Safety Geometry Collapse is the
    image curve under the text one; d' rather than their ratio, which divides noise where text
    barely separates, in the first layers)."""
    from ..calibration.report import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    cells = report["behaviour"]["cells"]
    fig, (left, right, collapse) = plt.subplots(1, 3, figsize=(16, 4))
    x = np.arange(len(cells))
    for side, shift in (("off", -0.2), ("on", 0.2)):
        rates = np.array([100 * c[f"refusal_{side}"] for c in cells])
        low, high = (np.array([100 * c[f"refusal_{side}_ci95"][k] for c in cells]) for k in (0, 1))
        left.bar(x + shift, rates, 0.4, yerr=np.stack([rates - low, high - rates]), capsize=3,
                 label=f"correction {side}")  # error bars: the 95 % Wilson intervals
    left.set_xticks(x, [f"{c['modality']}\n{c['label']}" for c in cells])
    left.set_ylabel("refusal rate (%)")
    left.set_ylim(0, 100)
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)  # above the bars
    layers = report["geometry"]["layers"]
    for state, style in (("off", "-"), ("on", "--")):
        gap = [row.get("image_text_gap") for row in layers[state]]
        if any(v is not None for v in gap):
            right.plot(range(len(gap)), [np.nan if v is None else v for v in gap], style, label=f"correction {state}")
    right.axhline(0, color="grey", linewidth=0.5)
    right.axvline(report["geometry"]["read_layer"]["layer"], color="grey", linestyle=":")
    right.set_xlabel("layer")
    right.set_ylabel("mean (image - text twin) . rhat")
    right.legend()

    def dprimes(state: str, key: str) -> list[float]:
        return [np.nan if row.get(key) is None else row[key] for row in layers[state]]

    collapse.plot(range(len(layers["off"])), dprimes("off", "dprime_T"), color="black", label="text")
    for state, style in (("off", "-"), ("on", "--")):
        collapse.plot(range(len(layers[state])), dprimes(state, "dprime_M"), style, label=f"image, correction {state}")
    collapse.axvline(report["geometry"]["read_layer"]["layer"], color="grey", linestyle=":")
    collapse.set_xlabel("layer")
    collapse.set_ylabel("d' harmful vs harmless along rhat")
    collapse.legend()
    fig.suptitle(f"{report['mode']}, positions {report['options']['positions']}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
