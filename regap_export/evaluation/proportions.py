"""How sure a refusal rate is: pure functions on counts (no numpy, no torch).

An evaluation cell holds tens of prompts, so one prompt moves its rate by 2-4 points, and
targets such as "over-refusal <= 10 %" are judged on 40 of them. ``evaluate`` therefore
reports, beside each rate, its 95 % Wilson score interval, and, for the change from
correction off to on on the same prompts, the exact McNemar test.

* Wilson (1927): the interval of proportions p with |k/n - p| <= z sqrt(p (1 - p) / n).
  Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty at 0 or n
  refusals; its coverage is close to nominal at small n (Brown, Cai and DasGupta 2001), and
  it needs only a square root.
* McNemar, exact: off and on are paired (the same prompts), so only the prompts whose
  decision changed carry information: b refused only with the correction, c only without.
  Under "the correction changes nothing on average" each changed prompt goes either way
  with probability 1/2, and the two-sided p-value is
  min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))), computed with exact integers.
"""
from __future__ import annotations

import math
from fractions import Fraction

# The 0.975 quantile of the standard normal distribution (a 95 % two-sided interval).
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n``, as (low, high) in [0, 1].

    ``ValueError`` for n < 1, successes outside [0, n] or z <= 0."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Exactly 0 (1) at no (all) successes, where rounding would leave a 1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """The two-sided exact McNemar p-value for paired binary outcomes.

    ``only_first``, ``only_second``: the pairs positive under one condition only (e.g. refused
    only with the correction on, refused only with it off). 1.0 when none changed.
    ``ValueError`` for a negative count."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be non-negative, got {only_first} and {only_second}")
    changed = only_first + only_second
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, i) for i in range(min(only_first, only_second) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** changed)))


def format_rate(rate: float, interval: tuple[float, float] | list[float]) -> str:
    """A rate and its interval as percentages, fixed width: `` 12.5% [ 5.5,  26.1]``."""
    low, high = interval
    return f"{100 * rate:5.1f}% [{100 * low:4.1f}, {100 * high:5.1f}]"
