"""validate's float32-noise rule: a float32 check over the fixed tolerance passes only when
ONNX Runtime's error against float64 is at most NOISE_FACTOR x PyTorch float32's own."""
from __future__ import annotations

import numpy as np

from regap_export.validation import NOISE_FACTOR, TOLERANCES, Check, Trace, judged_by_float32_noise

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
    judged = judged_by_float32_noise(failed(), f64, pytorch, ort, ATTENDED, TOL)
    assert judged.ok and "vs float64" in judged.detail and judged.max_abs_diff == 5e-4


def test_beyond_it_fails():
    f64, pytorch, ort = logits_case(4e-4, 4e-4 * NOISE_FACTOR + 5e-4)
    assert not judged_by_float32_noise(failed(), f64, pytorch, ort, ATTENDED, TOL).ok
    f64, pytorch, ort = logits_case(0.0, 0.05)  # an export bug: PyTorch exact, ORT far off
    assert not judged_by_float32_noise(failed(), f64, pytorch, ort, ATTENDED, TOL).ok


def test_cache_tensors_are_judged_at_attended_positions():
    exact = [np.zeros((1, 2, 4, 3)), np.ones((1, 2, 4, 3))]
    f64 = trace(presents=exact)
    pytorch = trace(presents=[t + 3e-4 for t in exact])
    ort = trace(presents=[t - 2e-4 for t in exact])
    assert judged_by_float32_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    ort.presents[1] = ort.presents[1].copy()
    ort.presents[1][0, 0, 2, 0] += 1.0
    assert not judged_by_float32_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    padded = np.array([[True, True, False, True]])  # the bad entry sits at a padding position
    assert judged_by_float32_noise(failed("present"), f64, pytorch, ort, padded, TOL).ok


def test_decode_steps_are_judged_on_the_same_tokens():
    f64, pytorch, ort = decode_case(4e-4, 3e-4)
    assert judged_by_float32_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL).ok
    f64, pytorch, ort = decode_case(4e-4, 0.05)
    assert not judged_by_float32_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL).ok
    # float64 decoded another sequence: its logits are no reference for these steps
    f64, pytorch, ort = decode_case(4e-4, 3e-4, f64_tokens=np.array([[5, 8, 9]]))
    judged = judged_by_float32_noise(failed("decode logits"), f64, pytorch, ort, ATTENDED, TOL)
    assert not judged.ok and "other tokens" in judged.detail


def test_passed_and_unjudged_checks_are_left_as_they_are():
    f64, pytorch, ort = logits_case(4e-4, 3e-4)
    passed = Check("onnxruntime-cpu", "text", "prefill logits", 5e-5, True)
    assert judged_by_float32_noise(passed, f64, pytorch, ort, ATTENDED, TOL) is passed
    tokens = failed("greedy tokens")
    assert judged_by_float32_noise(tokens, f64, pytorch, ort, ATTENDED, TOL) is tokens
