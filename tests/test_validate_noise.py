"""validate's float32-noise rule: a prefill check over the fixed tolerance passes only when
ONNX Runtime's error against float64 is at most NOISE_FACTOR x PyTorch float32's own."""
from __future__ import annotations

import numpy as np

from regap_export.validation import NOISE_FACTOR, TOLERANCES, Check, Float64Prefill, judged_by_float32_noise

TOL = TOLERANCES["fp32"]
ATTENDED = np.ones((1, 4), dtype=bool)


def logits_case(pytorch_error: float, ort_error: float):
    exact = np.linspace(-3, 3, 4 * 5).reshape(1, 4, 5)
    f64 = Float64Prefill(exact, [])
    return f64, (exact + pytorch_error).astype(np.float32), (exact - ort_error).astype(np.float32)


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
    f64 = Float64Prefill(np.zeros((1, 4, 5)), exact)
    pytorch = [t + 3e-4 for t in exact]
    ort = [t - 2e-4 for t in exact]
    assert judged_by_float32_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    ort[1] = ort[1].copy()
    ort[1][0, 0, 2, 0] += 1.0
    assert not judged_by_float32_noise(failed("present"), f64, pytorch, ort, ATTENDED, TOL).ok
    padded = np.array([[True, True, False, True]])  # the bad entry sits at a padding position
    assert judged_by_float32_noise(failed("present"), f64, pytorch, ort, padded, TOL).ok


def test_passed_and_unjudged_checks_are_left_as_they_are():
    f64, pytorch, ort = logits_case(4e-4, 3e-4)
    passed = Check("onnxruntime-cpu", "text", "prefill logits", 5e-5, True)
    assert judged_by_float32_noise(passed, f64, pytorch, ort, ATTENDED, TOL) is passed
    decode = failed("decode logits")
    assert judged_by_float32_noise(decode, f64, pytorch, ort, ATTENDED, TOL) is decode
