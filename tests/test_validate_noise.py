"""validate's rounding-noise rule: a check over the fixed tolerance passes only when ONNX
Runtime's error against the exact run (float64 for fp32 exports, float32 for fp16) is at most
NOISE_FACTOR x PyTorch's own at the export's precision."""
from __future__ import annotations

import numpy as np

import torch

from regap_export.validation import (NOISE_FACTOR, NOISE_PRECISIONS, TOLERANCES, Check, RoundingNoise, Trace,
                                     cast_trace, judged_by_rounding_noise)

TOL = TOLERANCES["fp32"]
ATTENDED = np.ones((1, 4), dtype=bool)
TOKENS = np.array([[5, 7, 9]])


def trace(prefill=None, steps=(), presents=None, tokens=TOKENS) -> Trace:
    return Trace(np.zeros((1, 4, 5)) if prefill is None else prefill, list(steps), tokens, presents)


def logits_case(pytorch_error: float, ort_error: float):
    exact = np.linspace(-3, 3, 4 * 5).reshape(1, 4, 5)
    return (trace(exact), trace((exact + pytorch_error).astype(np.float32)),
            trace((exact - ort_error).astype(np.float32)))


def decode_case(pytorch_error: float, ort_error: float, f64_tokens=TOKENS):
    exact = [np.linspace(-2, 2, 5)[None] * k for k in (1, 2)]
    return (trace(steps=exact, tokens=f64_tokens), trace(steps=[(s + pytorch_error).astype(np.float32) for s in exact]),
            trace(steps=[(s - ort_error).astype(np.float32) for s in exact]))


def failed(quantity: str = "prefill logits") -> Check:
    return Check("onnxruntime-cpu", "image", quantity, 5e-4, False)


def test_within_pytorchs_own_rounding_passes():
    f64, pytorch, ort = logits_case(4e-4, 3e-4)
    judged = judged_by_rounding_noise(failed(), f64, pytorch, ort, ATTENDED, TOL)
    assert judged.ok and "vs float64" in judged.detail and judged.max_abs_diff == 5e-4


def test_beyond_it_fails():
    f64, pytorch, ort = logits_case(4e-4, 4e-4 * NOISE_FACTOR + 5e-4)
    assert not judged_by_rounding_noise(failed(), f64, pytorch, ort, ATTENDED, TOL).ok
    f64, pytorch, ort = logits_case(0.0, 0.05)  # an export bug: PyTorch exact, ORT far off
    assert not judged_by_rounding_noise(failed(), f64, pytorch, ort, ATTENDED, TOL).ok


def test_cache_tensors_are_judged_at_attended_positions():
    exact = [np.zeros((1, 2, 4, 3)), np.ones((1, 2, 4, 3))]
    f64 = trace(presents=exact)
    pytorch = trace(presents=[t + 3e-4 for t in exact])
    ort = trace(presents=[t - 2e-4 for t in exact])
    assert judged_by_rounding_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    ort.presents[1] = ort.presents[1].copy()
    ort.presents[1][0, 0, 2, 0] += 1.0
    assert not judged_by_rounding_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    padded = np.array([[True, True, False, True]])  # the bad entry sits at a padding position
    assert judged_by_rounding_noise(failed("present"), f64, pytorch, ort, padded, TOL).ok


def test_decode_steps_are_judged_on_the_same_tokens():
    f64, pytorch, ort = decode_case(4e-4, 3e-4)
    assert judged_by_rounding_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL).ok
    f64, pytorch, ort = decode_case(4e-4, 0.05)
    assert not judged_by_rounding_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL).ok
    # float64 decoded another sequence: its logits are no reference for these steps
    f64, pytorch, ort = decode_case(4e-4, 3e-4, f64_tokens=np.array([[5, 8, 9]]))
    judged = judged_by_rounding_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL)
    assert not judged.ok and "other tokens" in judged.detail


def test_passed_and_unjudged_checks_are_left_as_they_are():
    f64, pytorch, ort = logits_case(4e-4, 3e-4)
    passed = Check("onnxruntime-cpu", "text", "prefill logits", 5e-5, True)
    assert judged_by_rounding_noise(passed, f64, pytorch, ort, ATTENDED, TOL) is passed
    tokens = failed("greedy tokens")
    assert judged_by_rounding_noise(tokens, f64, pytorch, ort, ATTENDED, TOL) is tokens


def test_fp16_is_judged_against_float32_with_pytorch_float16_as_the_noise():
    tol = TOLERANCES["fp16"]
    exact, pytorch, ort = logits_case(0.08, 0.14)  # about what an H200 gave on smollm2
    check = Check("onnxruntime-cuda", "text", "prefill logits", 0.14, False)
    judged = judged_by_rounding_noise(check, exact, pytorch, ort, ATTENDED, tol, NOISE_PRECISIONS["fp16"])
    assert judged.ok and "vs float32" in judged.detail and "PyTorch float16" in judged.detail
    exact, pytorch, ort = logits_case(0.08, 0.08 * NOISE_FACTOR + tol["logits"][0] + 0.01)
    assert not judged_by_rounding_noise(check, exact, pytorch, ort, ATTENDED, tol, NOISE_PRECISIONS["fp16"]).ok


def _text_inputs(loaded):
    from regap_export.validation import _batches

    return _batches(loaded, multimodal=False)["text"]


def test_rounding_noise_casts_a_copy_once_and_orders_the_runs(tiny_llama_folder):
    from regap_export.models.loading import load_model

    plain = load_model(tiny_llama_folder)
    inputs = _text_inputs(plain)
    reference = cast_trace(plain.model, inputs)
    seen = []

    def run(model):
        seen.append(model)
        return cast_trace(model, inputs)

    for dtype, copy_dtype in (("fp32", torch.float64), ("fp16", torch.float16)):
        seen.clear()
        noise = RoundingNoise(plain, dtype, "cpu")
        exact, own = noise.runs(reference, run)
        noise.runs(reference, run)
        assert seen[0] is seen[1] and seen[0] is not plain.model  # one copy, reused; the model untouched
        assert next(seen[0].parameters()).dtype == copy_dtype
        assert next(plain.model.parameters()).dtype == torch.float32
        cast = exact if dtype == "fp32" else own
        assert (own if dtype == "fp32" else exact) is reference
        gap = np.abs(cast.prefill_logits - reference.prefill_logits).max()
        # the same computation at another precision: close, not equal
        assert 0 < gap < (1e-5 if dtype == "fp32" else 5e-2)
        assert cast.prefill_logits.dtype in (np.float32, np.float64)
