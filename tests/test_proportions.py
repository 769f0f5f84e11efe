"""regap_export.evaluation.proportions against published values and independent computations."""
from __future__ import annotations

import itertools

import pytest

from regap_export.evaluation.proportions import Z_95, mcnemar_exact_p, wilson_interval


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II,
# method 3 (score interval without continuity correction), to the 4 decimals it prints.
@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (3, 7), (5, 40), (20, 40), (39, 40), (40, 40)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each interior bound p satisfies (k/n - p)^2 = z^2 p (1 - p) / n, and the interval holds k/n."""
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    for bound in (low, high):
        if bound in (0.0, 1.0):
            continue
        assert (k / n - bound) ** 2 == pytest.approx(Z_95 ** 2 * bound * (1 - bound) / n, rel=1e-9)
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)


def test_wilson_is_symmetric_and_narrows_with_n():
    low, high = wilson_interval(3, 40)
    assert wilson_interval(37, 40) == pytest.approx((1 - high, 1 - low), abs=1e-15)
    assert wilson_interval(30, 400)[1] - wilson_interval(30, 400)[0] < high - low


@pytest.mark.parametrize("k, n, z", [(0, 0, Z_95), (-1, 5, Z_95), (6, 5, Z_95), (2, 5, 0.0)])
def test_wilson_refuses_bad_counts(k, n, z):
    with pytest.raises(ValueError):
        wilson_interval(k, n, z)


def brute_force_p(b: int, c: int) -> float:
    """Two-sided p by enumerating every way the b + c changed pairs could have fallen, each
    equally likely: the share at least as far from an even split as the one observed."""
    m = b + c
    observed = abs(b - m / 2)
    outcomes = list(itertools.product((0, 1), repeat=m))
    return sum(abs(sum(o) - m / 2) >= observed for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("b, c", [(0, 1), (1, 0), (0, 5), (1, 9), (2, 2), (3, 4), (0, 11), (6, 1)])
def test_mcnemar_matches_enumeration(b, c):
    assert mcnemar_exact_p(b, c) == pytest.approx(brute_force_p(b, c), abs=1e-15)


def test_mcnemar_by_hand_and_edges():
    assert mcnemar_exact_p(0, 5) == 2 / 32
    assert mcnemar_exact_p(1, 9) == 2 * 11 / 1024
    assert mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0
    assert 0 < mcnemar_exact_p(0, 200) < 1e-59           # exact integers: no underflow to 0
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_module_needs_no_numpy_or_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['numpy'] = None; sys.modules['torch'] = None; "
            "import regap_export.evaluation.proportions as p; print(p.wilson_interval(1, 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
