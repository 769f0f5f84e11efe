"""`regap-export validate`: parity of an exported folder against the independent reference.

The oracle is the unmodified model (loaded from OUT's original weights) with the hook-based
corrections of ``reference.py``, computed from the copied ``directions.safetensors``. It is
compared with (a) the rewritten PyTorch model (``load_corrected``) and (b) ONNX Runtime on:
prefill logits (every attended position), the KV cache (``present.*``), 8 greedy decode
steps' logits and 32 greedy tokens, for a left-padded text batch and, for multimodal models,
a batch with images.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..calibration.directions_io import load_directions
from ..method.modality import INPUT_NAME as IMAGE_MASK, call_masks, without_channel
from ..errors import RegapError
from ..io.artifacts import ExportedFolder
from ..io.atomic import write_json_atomic
from ..export.manifest import record_parity
from ..export.pipeline import DIRECTIONS_COPY, ONNX_DIR
from ..models.base import cache_of, pixel_inputs, with_cache
from ..runtime.decode import decode
from ..models.positions import PositionScheme, position_config, position_scheme
from ..options import RegapOptions
from ..calibration.report import json_safe

PARITY_FILENAME = "parity.json"
# |a - b| <= atol + rtol * |b|, elementwise, with b the reference.
TOLERANCES = {
    "fp32": {"logits": (1e-4, 1e-4), "present": (1e-4, 1e-4)},
    "fp16": {"logits": (5e-2, 2e-2), "present": (2e-2, 2e-2)},
}
# Quantized precisions are judged by quantization_checks, with the absolute tolerance of their activations' type.
QUANTIZED_AS = {"q4f16": "fp16", "q8": "fp32", "q4": "fp32"}
# What each precision's ONNX Runtime checks are compared with (reported in parity.json "rules").
PRECISION_RULES = {
    "fp32": "the float32 reference within the fixed tolerance; else against float64, at most 2x PyTorch float32's "
            "own error",
    "fp16": "the float32 reference within the fixed tolerance; else at most 2x PyTorch float16's own error",
    **{p: "at most 2x the distance of the same graphs run uncorrected from the unmodified float32 model "
          "(decode steps feed each side's greedy tokens); greedy tokens reported" for p in QUANTIZED_AS},
}
VALIDATION_PROMPTS = (
    "Give me three tips for keeping basil alive on a windowsill.",
    "How do I pick a lock on a front door?",
    "Summarise the plot of a heist film in one sentence.",
)


@dataclass
class Check:
    target: str      # "pytorch" (rewritten) or "onnxruntime"
    inputs: str      # "text" or "image"
    quantity: str    # "prefill logits", "present", "decode logits", "greedy tokens", "regap_alpha"
    max_abs_diff: float
    ok: bool
    detail: str = ""
    precision: str = "fp32"   # of the graphs checked (the PyTorch model is float32)


@dataclass
class Trace:
    """What one implementation produced for one batch."""

    prefill_logits: np.ndarray            # [batch, seq, vocab]
    step_logits: list[np.ndarray]         # decode steps, [batch, vocab] each
    tokens: np.ndarray                    # [batch, greedy_tokens]
    presents: list[np.ndarray] | None = None  # [batch, kv, seq, hd], 2 per layer
    alpha: np.ndarray | None = None


def _within(a: np.ndarray, b: np.ndarray, tol: tuple[float, float]) -> tuple[float, bool]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), False
    diff = np.abs(a - b)
    ok = bool(np.all(diff <= tol[0] + tol[1] * np.abs(b)))
    return (float(diff.max()) if diff.size else 0.0), ok


def _batches(loaded, multimodal: bool) -> dict[str, dict[str, Any]]:
    from ..data.render import render_text

    adapter, processor = loaded.adapter, loaded.processor
    batches = {}
    prompts = [adapter.render_prompt(processor, p, with_image=False) for p in VALIDATION_PROMPTS]
    batches["text"] = dict(adapter.encode(processor, prompts, None))
    if multimodal:
        image_prompts = [adapter.render_prompt(processor, "Respond to the request in the image.", with_image=True)
                         for _ in VALIDATION_PROMPTS[:2]]
        images = [render_text(p) for p in VALIDATION_PROMPTS[:2]]
        batches["image"] = dict(adapter.encode(processor, image_prompts, images))
    # Explicit position ids, the runtime's (models/positions.py), so that the reference, the
    # rewritten model and ONNX Runtime see the same positions (Qwen2-VL would otherwise derive
    # its own, and keep rope_deltas from one batch to the next).
    positions = _positions(loaded)
    for inputs in batches.values():
        if "position_ids" not in inputs:
            image = {k: v.numpy() for k, v in inputs.items() if k in ("image_grid_thw", "mm_token_type_ids")}
            inputs["position_ids"] = torch.from_numpy(
                positions.prefill(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), **image))
    return batches


def _positions(loaded) -> PositionScheme:
    return position_scheme(position_config(loaded.adapter.family, loaded.model.config))


@dataclass
class MaskFeed:
    """The image masks of one batch (``regap_export.method.modality``): [batch, seq] for the prompt,
    [batch, 1] for each decode step; ``current`` is the one of the call in progress."""

    prompt: torch.Tensor | None
    step: torch.Tensor | None
    current: torch.Tensor | None = None

    @classmethod
    def for_batch(cls, positions: str, input_ids: torch.Tensor, image_token_id: int | None) -> "MaskFeed":
        prompt, step = call_masks(positions, input_ids.numpy(), image_token_id)
        return cls(torch.from_numpy(prompt), torch.from_numpy(step))


@torch.no_grad()
def torch_trace(model, inputs: dict[str, Any], steps: int, greedy: int, extra: dict[str, Any],
                positions: PositionScheme | None = None, masks: MaskFeed | None = None,
                mask_kwarg: bool = False) -> Trace:
    """``positions`` continues ``inputs["position_ids"]`` at every decode step (default: text).
    ``masks.current`` follows the calls (prompt, then steps); ``mask_kwarg`` also passes it to
    the model as ``regap_image_mask`` (the rewritten model; the reference reads ``current``)."""
    positions = position_scheme(None) if positions is None else positions

    def with_mask(kwargs: dict[str, Any], mask: torch.Tensor | None) -> dict[str, Any]:
        if masks is not None:
            masks.current = mask
            if mask_kwarg:
                kwargs = {**kwargs, IMAGE_MASK: mask}
        return kwargs

    out = model(**with_mask({**inputs, **extra}, None if masks is None else masks.prompt), use_cache=True)
    cache = cache_of(out)
    prefill = _as_numpy(out.logits)
    presents = []
    for layer in cache.layers:
        presents += [_as_numpy(layer.keys), _as_numpy(layer.values)]
    mask = inputs["attention_mask"]
    position = inputs.get("position_ids")
    step_logits: list[np.ndarray] = []

    def step(token: np.ndarray) -> np.ndarray:
        nonlocal mask, position, cache
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        kwargs = dict(input_ids=torch.from_numpy(token[:, None]).to(mask.device), attention_mask=mask,
                      use_cache=True, **with_cache(model, cache), **extra)
        if position is not None:
            position = torch.from_numpy(positions.next(position.cpu().numpy())).to(mask.device)
            kwargs["position_ids"] = position
        out = model(**with_mask(kwargs, None if masks is None else masks.step))
        cache = cache_of(out)
        if len(step_logits) < steps:
            step_logits.append(_as_numpy(out.logits[:, -1]))
        return _exact_numpy(out.logits[:, -1])

    tokens = decode(_exact_numpy(out.logits[:, -1]), step, max_new_tokens=greedy)
    return Trace(prefill, step_logits, tokens, presents)


def _exact_numpy(t: torch.Tensor) -> np.ndarray:
    """On the CPU in float64, which holds every float type exactly (numpy has no bfloat16), so
    the argmax is the model's own."""
    return t.detach().cpu().double().numpy()


def ort_trace(sessions, inputs: dict[str, Any], steps: int, greedy: int, alpha: np.ndarray | None, *,
              forced: np.ndarray | None = None, correct: bool = True) -> Trace:
    """Prefill, ``steps`` decode steps (feeding ``forced`` [batch, >= steps] tokens when given,
    else the argmax) and ``greedy`` tokens of the user-facing loop (none for 0), on the runtime."""
    from ..method.modality import clear_image_flags
    from ..runtime.decode import extend_attention
    from ..runtime.generate import correction_masks, generate

    ids = inputs["input_ids"].numpy()
    mask = inputs["attention_mask"].numpy().astype(np.int64)
    pixels = {k: v.numpy() for k, v in pixel_inputs(inputs).items()}
    # The runtime's own positions, from regap_onnx.json (image tokens found by their id).
    positions = sessions.positions
    position = positions.prefill(ids, mask, **pixels)
    main = sessions.prompt_embeds(ids, **pixels) if sessions.multimodal else ids
    if sessions.image_channel and not correct:
        main = clear_image_flags(main)
    # The runtime's own masks, from regap_onnx.json (positions option and image token id).
    image_mask, step_image_mask = correction_masks(sessions, ids, correct=correct)
    out = sessions.run_decoder(main, mask, position, sessions.empty_past(ids.shape[0]), regap_alpha=alpha,
                               regap_image_mask=image_mask)
    presents = [np.asarray(p, dtype=np.float32) for p in out.presents]
    if sessions.image_channel:  # compared as the model's keys: without the image flag channel
        presents[0] = without_channel(presents[0])
    prefill = np.asarray(out.logits, dtype=np.float32)
    step_logits: list[np.ndarray] = []

    def step(token: np.ndarray) -> np.ndarray:
        nonlocal mask, position, out
        mask = extend_attention(mask)
        position = positions.next(position)
        main = sessions.embed(token[:, None]) if sessions.multimodal else token[:, None]
        out = sessions.run_decoder(main, mask, position, out.presents, regap_alpha=alpha,
                                   regap_image_mask=step_image_mask)
        step_logits.append(np.asarray(out.logits[:, -1], dtype=np.float32))
        return out.logits[:, -1]

    def forced_or_greedy(logits: np.ndarray) -> np.ndarray:
        column = len(step_logits)
        return logits.argmax(-1) if forced is None or column >= forced.shape[1] else forced[:, column]

    # ``steps`` tokens fed back: the loop's last token is never fed, so one more is picked.
    decode(out.logits[:, -1], step, max_new_tokens=steps + 1, select=forced_or_greedy)
    # The user-facing loop, two-pass regap-seq included, for the greedy tokens.
    tokens, used_alpha = np.zeros((ids.shape[0], 0), np.int64), alpha
    if greedy:
        result = generate(sessions, ids, inputs["attention_mask"].numpy(), max_new_tokens=greedy, eos_token_id=[],
                          correct=correct, **pixels)
        tokens, used_alpha = result.new_tokens, result.regap_alpha
    return Trace(prefill, step_logits, tokens, presents, used_alpha)


def _attended_cache(got: list[np.ndarray], want: list[np.ndarray], attended: np.ndarray):
    """(got, want) per cache tensor, at attended positions. A sliding-window layer's cache in
    transformers keeps only the last W positions; the exported graph keeps them all (its mask
    applies the window)."""
    for g, w in zip(got, want):
        kept = w.shape[2]
        window = attended[:, -kept:]
        yield g[:, :, -kept:].transpose(0, 2, 1, 3)[window], w.transpose(0, 2, 1, 3)[window]


# Rounding noise. A model can be so sensitive to its inputs that PyTorch's own float32 result
# differs from the same computation in float64 by more than the fixed tolerance (measured on
# embedded:organism's image rows: up to 1.3e-3 against 1e-4). No float32 implementation can then
# meet the tolerance, so a float32 check that misses it is judged against float64 instead: it
# passes when ONNX Runtime's error is at most NOISE_FACTOR times PyTorch's own (plus atol). An
# export bug gives errors orders of magnitude above both (TF32 on the CUDA provider gave 1500
# times PyTorch's float32 error on embedded:smollm2). The report says which rule decided.
# fp16 exports are judged the same way one step down: the float32 reference is the exact run
# and PyTorch in float16 on the same device gives the rounding noise (on an H200, ONNX Runtime
# CUDA fp16 against float32 differed by 0.14 in smollm2's prefill logits, over the fixed 0.05).
# Decode logits are judged only when the exact run chose the same tokens as PyTorch's, so that
# all three runs decode the same sequence.
NOISE_JUDGED = ("prefill logits", "present", "decode logits", "prefill logits, image channel cleared",
                "prefill logits, no mask fed")
NOISE_FACTOR = 2.0
# (the exact run, the run at the export's precision), by the export's dtype
NOISE_PRECISIONS = {"fp32": (torch.float64, torch.float32), "fp16": (torch.float32, torch.float16)}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """float32 and float64 as they are; half types widened to float32; on the CPU."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype in (torch.float32, torch.float64) else t.float().numpy()


def model_copy_in(plain, dtype: torch.dtype, device: str = "cpu"):
    """A copy of ``plain.model`` in ``dtype`` on ``device`` (the original is left as it is)."""
    import copy

    return copy.deepcopy(plain.model).to(device=device, dtype=dtype)


def _cast_inputs(inputs: dict[str, Any], model) -> dict[str, Any]:
    param = next(model.parameters())
    return {k: (v.to(device=param.device, dtype=param.dtype) if torch.is_floating_point(v) else v.to(param.device))
            for k, v in inputs.items()}


@torch.no_grad()
def cast_trace(model, inputs: dict[str, Any], corrections=None, *, steps: int = 0,
               positions: PositionScheme | None = None, masks: MaskFeed | None = None) -> Trace:
    """The trace of ``model`` (a ``model_copy_in`` copy): prefill and ``steps`` greedy decode steps,
    inside ``corrections(model)`` (a context manager factory) when given."""
    import contextlib

    with corrections(model) if corrections is not None else contextlib.nullcontext():
        return torch_trace(model, _cast_inputs(inputs, model), steps, steps + 1, {}, positions, masks)


def _worst(pairs) -> float:
    return max((float(np.abs(np.asarray(a, np.float64) - b).max(initial=0.0)) for a, b in pairs), default=0.0)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def judged_by_rounding_noise(check: Check, exact: Trace, reference: Trace, other: Trace, attended: np.ndarray,
                             tol: dict[str, tuple[float, float]],
                             precisions: tuple[torch.dtype, torch.dtype] = NOISE_PRECISIONS["fp32"]) -> Check:
    """``check`` (failed on the fixed tolerance) judged against ``exact``, the run at the first of
    ``precisions``: ``reference`` is PyTorch at the second (the export's), ``other`` ONNX Runtime;
    the check's quantity says which of their tensors."""
    if check.ok or check.quantity not in NOISE_JUDGED:
        return check
    exact_name, own_name = (_name(d) for d in precisions)
    if check.quantity == "present":
        pytorch = _worst(_attended_cache(reference.presents, exact.presents, attended))
        ours = _worst(_attended_cache(other.presents, exact.presents, attended))
        atol = tol["present"][0]
    elif check.quantity == "decode logits":
        steps = len(reference.step_logits)
        if len(exact.step_logits) < steps or not np.array_equal(exact.tokens[:, :steps], reference.tokens[:, :steps]):
            return dataclasses.replace(check, ok=False, detail="; ".join(
                d for d in (check.detail, f"{exact_name} decoded other tokens: not judged") if d))
        pytorch = _worst(zip(reference.step_logits, exact.step_logits))
        ours = _worst(zip(other.step_logits, exact.step_logits))
        atol = tol["logits"][0]
    else:
        pytorch = _worst([(reference.prefill_logits[attended], exact.prefill_logits[attended])])
        ours = _worst([(other.prefill_logits[attended], exact.prefill_logits[attended])])
        atol = tol["logits"][0]
    ok = ours <= NOISE_FACTOR * pytorch + atol
    detail = (f"vs {exact_name}: ORT {ours:.2g}, PyTorch {own_name} {pytorch:.2g} "
              f"({'<=' if ok else '>'} {NOISE_FACTOR:g}x)")
    return dataclasses.replace(check, ok=ok, detail="; ".join(d for d in (check.detail, detail) if d))


@dataclass
class RoundingNoise:
    """The two PyTorch runs that judge a failed ONNX Runtime check (NOISE_PRECISIONS): one of
    them is the reference itself (the model as loaded, float32), the other a cast copy of it,
    made once: float64 on the CPU for an fp32 export, float16 on the validation device for fp16."""

    plain: Any
    dtype: str
    device: str
    _copy: Any = None

    @property
    def precisions(self) -> tuple[torch.dtype, torch.dtype]:
        return NOISE_PRECISIONS[self.dtype]

    def runs(self, reference, run):
        """(exact, at the export's precision): ``reference`` and ``run`` on the cast copy."""
        exact, own = self.precisions
        if self._copy is None:
            self._copy = (model_copy_in(self.plain, exact) if self.dtype == "fp32"
                          else model_copy_in(self.plain, own, self.device))
        other = run(self._copy)
        return (other, reference) if self.dtype == "fp32" else (reference, other)


def compare(reference: Trace, other: Trace, mask: np.ndarray, *, target: str, inputs: str,
            tol: dict[str, tuple[float, float]], precision: str = "fp32") -> list[Check]:
    checks = compare_at(reference, other, mask, target=target, inputs=inputs, tol=tol)
    return [dataclasses.replace(c, precision=precision) for c in checks]


def compare_at(reference: Trace, other: Trace, mask: np.ndarray, *, target: str, inputs: str,
               tol: dict[str, tuple[float, float]]) -> list[Check]:
    checks = []
    attended = mask.astype(bool)
    diff, ok = _within(other.prefill_logits[attended], reference.prefill_logits[attended], tol["logits"])
    checks.append(Check(target, inputs, "prefill logits", diff, ok))
    if other.presents is not None:
        worst, all_ok = 0.0, len(other.presents) == len(reference.presents)
        for got, want in _attended_cache(other.presents, reference.presents, attended):
            d, k = _within(got, want, tol["present"])
            worst, all_ok = max(worst, d), all_ok and k
        checks.append(Check(target, inputs, "present", worst, all_ok, f"{len(other.presents)} tensors"))
    worst, all_ok = 0.0, len(other.step_logits) == len(reference.step_logits)
    for got, want in zip(other.step_logits, reference.step_logits):
        d, k = _within(got, want, tol["logits"])
        worst, all_ok = max(worst, d), all_ok and k
    checks.append(Check(target, inputs, "decode logits", worst, all_ok, f"{len(reference.step_logits)} steps"))
    same = other.tokens.shape == reference.tokens.shape and bool(np.array_equal(other.tokens, reference.tokens))
    mismatches = int((other.tokens != reference.tokens).sum()) if other.tokens.shape == reference.tokens.shape else -1
    checks.append(Check(target, inputs, "greedy tokens", float(mismatches), same, f"{reference.tokens.shape[1]} tokens"))
    if reference.alpha is not None and other.alpha is not None:
        d, k = _within(other.alpha, reference.alpha, (1e-4, 1e-4))
        checks.append(Check(target, inputs, "regap_alpha", d, k))
    return checks


@torch.no_grad()
def _default_mask_check(plain, bundle, options: RegapOptions, sessions, inputs: dict[str, Any],
                        alpha: torch.Tensor | None, name: str, tol, device: str, noise: RoundingNoise) -> Check:
    """Prefill logits when no ``regap_image_mask`` is fed (what a client that does not know
    the input gets): ONNX Runtime's overridable default against the reference's default."""
    from .reference import reference_corrections

    def prefill(model) -> Trace:
        with reference_corrections(model, plain.adapter, bundle.directions, options, sequence_alpha=alpha):
            logits = model(**_cast_inputs(inputs, model), use_cache=False).logits
        return Trace(_as_numpy(logits), [], np.zeros((0, 0)))

    reference = prefill(plain.model)
    want = reference.prefill_logits
    ids = inputs["input_ids"].numpy()
    attention = inputs["attention_mask"].numpy().astype(np.int64)
    pixels = {k: v.numpy() for k, v in pixel_inputs(inputs).items()}
    main = sessions.prompt_embeds(ids, **pixels) if sessions.multimodal else ids
    got = sessions.run_decoder(main, attention, inputs["position_ids"].numpy(), sessions.empty_past(ids.shape[0]),
                               regap_alpha=None if alpha is None else alpha.numpy()).logits
    attended = attention.astype(bool)
    diff, ok = _within(got[attended], want[attended], tol["logits"])
    check = Check(f"onnxruntime-{device}", name, "prefill logits, no mask fed", diff, ok, precision=sessions.precision)
    if not ok:
        exact, own = noise.runs(reference, prefill)
        check = judged_by_rounding_noise(check, exact, own, Trace(got, [], np.zeros((0, 0))), attended, tol,
                                         noise.precisions)
    return check


@torch.no_grad()
def _cleared_channel_check(plain, sessions, inputs: dict[str, Any], alpha: torch.Tensor | None, name: str, tol,
                           device: str, noise: RoundingNoise) -> Check:
    """Prefill logits when the image rows reach the decoder with the modality channel cleared
    (how the runtime switches the correction off on a channel export): the unmodified model's."""
    from ..method.modality import clear_image_flags

    want = plain.model(**inputs, use_cache=False).logits.float().numpy()
    ids = inputs["input_ids"].numpy()
    attention = inputs["attention_mask"].numpy().astype(np.int64)
    pixels = {k: v.numpy() for k, v in pixel_inputs(inputs).items()}
    main = clear_image_flags(sessions.prompt_embeds(ids, **pixels))
    got = sessions.run_decoder(main, attention, inputs["position_ids"].numpy(), sessions.empty_past(ids.shape[0]),
                               regap_alpha=None if alpha is None else alpha.numpy()).logits
    attended = attention.astype(bool)
    diff, ok = _within(got[attended], want[attended], tol["logits"])
    check = Check(f"onnxruntime-{device}", name, "prefill logits, image channel cleared", diff, ok,
                  precision=sessions.precision)
    if not ok:
        exact, own = noise.runs(Trace(want, [], np.zeros((0, 0))), lambda model: cast_trace(model, inputs))
        check = judged_by_rounding_noise(check, exact, own, Trace(got, [], np.zeros((0, 0))), attended, tol,
                                         noise.precisions)
    return check


def _folder_precisions(sessions_folder: Path, manifest: dict[str, Any], wanted: Sequence[str] | None) -> list[str]:
    """The precisions to validate: ``wanted``, or every one the export wrote."""
    from ..io.artifacts import read_config

    from ..io.graph_metadata import PRECISIONS

    listed = read_config(sessions_folder).get("precisions") or ["fp32"]
    written = [p for p in PRECISIONS if p in listed]
    if wanted is None:
        return written
    missing = [p for p in wanted if p not in written]
    if missing:
        raise RegapError(f"this export holds no {', '.join(missing)} graphs (it has {', '.join(written)})",
                         path=sessions_folder, hint=f"validate --precision {','.join(written)}")
    return list(wanted)


def quantization_checks(reference: Trace, plain: Trace, corrected: Trace, uncorrected: Trace, attended: np.ndarray, *,
                        target: str, inputs: str, precision: str, atol: float) -> list[Check]:
    """A quantized precision changes the model's weights, so its graphs cannot match the float32
    reference within rounding. Judged instead against what the precision does to the unmodified
    model: the corrected graphs' distance from the corrected reference (``corrected`` vs
    ``reference``) may be at most NOISE_FACTOR times the same graphs' distance, run uncorrected,
    from the unmodified model (``uncorrected`` vs ``plain``), plus ``atol``: the correction adds
    no error of its own. Decode steps feed each comparand's own greedy tokens, so both sides
    decode the same sequence. Greedy tokens and regap_alpha are reported, not required."""
    checks = []
    pairs = {
        "prefill logits": ([(corrected.prefill_logits[attended], reference.prefill_logits[attended])],
                           [(uncorrected.prefill_logits[attended], plain.prefill_logits[attended])]),
        "present": (list(_attended_cache(corrected.presents, reference.presents, attended)),
                    list(_attended_cache(uncorrected.presents, plain.presents, attended))),
        "decode logits": (list(zip(corrected.step_logits, reference.step_logits)),
                          list(zip(uncorrected.step_logits, plain.step_logits))),
    }
    for quantity, (ours, noise) in pairs.items():
        got, own = _worst(ours), _worst(noise)
        ok = got <= NOISE_FACTOR * own + atol
        checks.append(Check(target, inputs, quantity, got, ok,
                            f"vs float32 reference {got:.2g}; the same {precision} graphs uncorrected vs the "
                            f"unmodified model {own:.2g} ({'<=' if ok else '>'} {NOISE_FACTOR:g}x)", precision))
    if corrected.tokens.size:
        same = int((corrected.tokens == reference.tokens).sum()) if corrected.tokens.shape == reference.tokens.shape \
            else 0
        checks.append(Check(target, inputs, "greedy tokens", float(reference.tokens.size - same), True,
                            f"{same} of {reference.tokens.size} equal to the reference (reported, not required at "
                            f"{precision})", precision))
    if reference.alpha is not None and corrected.alpha is not None:
        d = float(np.abs(np.asarray(corrected.alpha, np.float64) - reference.alpha).max())
        checks.append(Check(target, inputs, "regap_alpha", d, True, f"reported, not required at {precision}", precision))
    return checks


def validate_folder(out_dir: Path, *, device: str = "cpu", decode_steps: int = 8, greedy_tokens: int = 32,
                    write: bool = True, precisions: Sequence[str] | None = None) -> dict[str, Any]:
    """``precisions``: which of the export's ONNX precisions to check (default: every one it wrote)."""
    from ..export.load import load_corrected
    from ..models.loading import load_model
    from .reference import reference_corrections, reference_sequence_alpha

    out_dir = Path(out_dir)
    if device not in ("cpu", "cuda"):
        raise RegapError(f"unknown device {device!r}; choose cpu or cuda")
    exported = ExportedFolder.open(out_dir)  # verified before anything in it is read
    manifest = exported.manifest
    if "safetensors" not in manifest["formats"]:
        raise RegapError("validate needs the safetensors checkpoint in the folder (its original weights feed the "
                         "reference)", path=out_dir, hint="export with --format onnx,safetensors")
    bundle = load_directions(exported.path(DIRECTIONS_COPY))
    options = RegapOptions.from_json(manifest["options"])
    plain = load_model(out_dir)
    rewritten = load_corrected(out_dir)
    sessions: dict[str, Any] = {}
    if "onnx" in manifest["formats"]:
        from ..runtime.session import OrtSessions

        for precision in _folder_precisions(out_dir / ONNX_DIR, manifest, precisions):
            sessions[precision] = OrtSessions.open(out_dir / ONNX_DIR, device=device, precision=precision)
    checks: list[Check] = []
    noises = {p: RoundingNoise(plain, p, device) for p in sessions if p in NOISE_PRECISIONS}
    positions = _positions(plain)
    image_token_id = plain.adapter.image_token_id(plain.model.config)
    target = f"onnxruntime-{device}"
    for name, inputs in _batches(plain, plain.adapter.multimodal).items():
        extra: dict[str, Any] = {}
        alpha = None
        masks = MaskFeed.for_batch(options.positions, inputs["input_ids"], image_token_id)
        if options.mode == "regap-seq":
            alpha = reference_sequence_alpha(plain.model, plain.adapter, bundle.directions, options, inputs,
                                             image_mask=masks.prompt).float()
        with reference_corrections(plain.model, plain.adapter, bundle.directions, options, sequence_alpha=alpha,
                                   image_mask=lambda: masks.current):
            reference = torch_trace(plain.model, inputs, decode_steps, greedy_tokens, {}, positions, masks)
        if alpha is not None:
            reference.alpha = alpha.numpy()
            extra["regap_alpha"] = alpha
        mask = inputs["attention_mask"].numpy()
        checks += compare(reference, torch_trace(rewritten.model, inputs, decode_steps, greedy_tokens, extra,
                                                 positions, masks, mask_kwarg=True),
                          mask, target="pytorch", inputs=name, tol=TOLERANCES["fp32"])
        unmodified = None
        for precision, session in sessions.items():
            ort_alpha = None if alpha is None else alpha.numpy()
            if precision not in NOISE_PRECISIONS:  # quantized
                if unmodified is None:
                    unmodified = torch_trace(plain.model, inputs, decode_steps, decode_steps + 1, {}, positions)
                corrected = ort_trace(session, inputs, decode_steps, greedy_tokens, ort_alpha, forced=reference.tokens)
                uncorrected = ort_trace(session, inputs, decode_steps, 0, ort_alpha, forced=unmodified.tokens,
                                        correct=False)
                checks += quantization_checks(reference, unmodified, corrected, uncorrected, mask.astype(bool),
                                              target=target, inputs=name, precision=precision,
                                              atol=TOLERANCES[QUANTIZED_AS[precision]]["logits"][0])
                continue
            tol, noise = TOLERANCES[precision], noises[precision]
            ort = ort_trace(session, inputs, decode_steps, greedy_tokens, ort_alpha)
            ort_checks = compare(reference, ort, mask, target=target, inputs=name, tol=tol, precision=precision)
            if any(not c.ok and c.quantity in NOISE_JUDGED for c in ort_checks):
                def corrections(model, alpha=alpha, masks=masks):
                    return reference_corrections(model, plain.adapter, bundle.directions, options,
                                                 sequence_alpha=alpha, image_mask=lambda: masks.current)
                exact, own = noise.runs(reference, lambda model: cast_trace(
                    model, inputs, corrections, steps=decode_steps, positions=positions, masks=masks))
                ort_checks = [judged_by_rounding_noise(c, exact, own, ort, mask.astype(bool), tol, noise.precisions)
                              for c in ort_checks]
            checks += ort_checks
            if session.has_image_mask:
                checks.append(_default_mask_check(plain, bundle, options, session, inputs, alpha, name, tol, device,
                                                  noise))
            elif session.image_channel and name == "image":
                checks.append(_cleared_channel_check(plain, session, inputs, alpha, name, tol, device, noise))
    report = {"ok": all(c.ok for c in checks), "device": device, "precisions": list(sessions) or ["fp32"],
              "mode": options.mode,
              **({"cuda_tf32": any(s.cuda_tf32 for s in sessions.values())} if sessions and device == "cuda" else {}),
              "tolerances": {p: {k: list(v) for k, v in TOLERANCES[QUANTIZED_AS.get(p, p)].items()}
                             for p in (list(sessions) or ["fp32"])},
              "rules": {p: PRECISION_RULES[p] for p in (list(sessions) or ["fp32"])},
              "checks": [asdict(c) for c in checks]}
    if write:
        write_json_atomic(out_dir / PARITY_FILENAME, json_safe(report))
        record_parity(out_dir, report)
    return report
