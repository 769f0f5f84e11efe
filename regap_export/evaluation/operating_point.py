"""`tune`'s choices, as plain functions: the split by pairs, the candidates, the proxy's
threshold, the figures and the rule (docs/METHOD.md, "How tune chooses the operating point").

Nothing here runs a model: records in, parts out; decisions in, figures out. ``tune.py`` runs
the model and the exports.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import DataError, RegapError
from ..options import Band, RegapOptions
from .behaviour import paired_refusals

PARTS = ("fit", "select", "report")
# Shares of the records (by label) that go to each part. Fit: the directions and the gate's
# anchors need the most rows; select: every candidate is scored and the finalists generated
# there; report: the chosen options' figures, on records neither fitted nor selected on.
DEFAULT_SHARES = (0.5, 0.3, 0.2)
GROUP_BY = ("pair", "category")
# The fewest records of each class (T+, T-, M+, M-) a part may hold after the split: below it
# a refusal rate moves by 25 points per record, and the gate's fit has nothing to fit.
MIN_PER_PART = 4
DEFAULT_BUDGET = 0.03

RULE = ("the most harmful image requests refused, among the options whose harmless image requests are "
        "refused at most {budget:g} points more often than the text path refuses the same requests as text and "
        "whose text replies are identical to the uncorrected model's; a tie goes to the simpler option (fewer "
        "options changed from calibrate's defaults, then regap before fixed before regap-seq, then the gate "
        "reading rhat before the discriminant)")
FALLBACK_RULE = ("no option met the over-refusal budget: the option with the fewest harmless image refusals, "
                 "then the most harmful ones refused, then the simpler")


def rule_text(budget: float) -> str:
    return RULE.format(budget=round(100 * budget, 6))


# ------------------------------------------------------------------------------- the split
@dataclass
class TuneSplit:
    fit: list
    select: list
    report: list
    group_by: str
    seed: int
    shares: tuple[float, float, float]

    def part(self, name: str) -> list:
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: class_counts(self.part(name)) for name in PARTS}


def class_counts(records: Iterable[Any]) -> dict[str, int]:
    counts = {"T+": 0, "T-": 0, "M+": 0, "M-": 0}
    for r in records:
        counts[r.class_key] += 1
    return counts


def record_groups(records: Sequence[Any], group_by: str = "pair") -> list[list[Any]]:
    """Records that must land in the same part: a record and its ``pair`` (text and image twin)
    always; with ``group_by="category"`` every record of a category too (requests built from one
    object or prompt family, which share words). Groups keep the records' order."""
    if group_by not in GROUP_BY:
        raise RegapError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUP_BY)}")
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    index = {r.id: i for i, r in enumerate(records)}
    for i, r in enumerate(records):
        if r.pair and r.pair in index:
            join(i, index[r.pair])
    if group_by == "category":
        first: dict[str, int] = {}
        for i, r in enumerate(records):
            if r.category:
                join(i, first.setdefault(r.category, i))
    groups: dict[int, list[Any]] = {}
    for i, r in enumerate(records):
        groups.setdefault(find(i), []).append(r)
    return list(groups.values())


def split_records(records: Sequence[Any], *, shares: Sequence[float] = DEFAULT_SHARES, seed: int = 0,
                  group_by: str = "pair", source: str | None = None) -> TuneSplit:
    """The fit / select / report parts: groups (``record_groups``) never straddle two parts; within
    each label (and, grouped by pair, each category) the groups are shuffled with ``seed`` and
    dealt out by ``shares`` of their records. A part left with fewer than MIN_PER_PART records of
    a class is a DataError naming ``source``."""
    shares = tuple(float(s) for s in shares)
    if len(shares) != 3 or any(not 0 < s < 1 for s in shares) or abs(sum(shares) - 1) > 1e-9:
        raise RegapError(f"--shares must be three numbers in (0, 1) that add up to 1 (fit, select, report), "
                         f"got {', '.join(map(str, shares))}")
    groups = record_groups(records, group_by)
    labels = {frozenset(r.label for r in g) for g in groups}
    if any(len(ls) > 1 for ls in labels):
        raise DataError("a pair joins a harmful and a harmless record", path=source, field="pair")
    by_label: dict[str, list[list[Any]]] = {}
    rng = random.Random(seed)
    for label in sorted({g[0].label for g in groups}):
        strata: dict[str, list[list[Any]]] = {}
        for g in groups:
            if g[0].label == label:
                strata.setdefault((g[0].category or "") if group_by == "pair" else "", []).append(g)
        ordered: list[list[Any]] = []
        for key in sorted(strata):
            stratum = sorted(strata[key], key=lambda g: min(r.id for r in g))
            rng.shuffle(stratum)
            ordered += stratum
        by_label[label] = ordered
    parts: dict[str, list[Any]] = {name: [] for name in PARTS}
    for ordered in by_label.values():
        # Each group goes to the part furthest below its share of the records dealt so far, so
        # every stretch of the order (each category) is shared out about as the whole is.
        placed = {name: 0 for name in PARTS}
        for g in ordered:
            total = sum(placed.values()) + len(g)
            name = max(PARTS, key=lambda n: (shares[PARTS.index(n)] * total - placed[n], -PARTS.index(n)))
            parts[name].extend(g)
            placed[name] += len(g)
    order = {r.id: i for i, r in enumerate(records)}
    split = TuneSplit(*(sorted(parts[name], key=lambda r: order[r.id]) for name in PARTS),
                      group_by=group_by, seed=seed, shares=shares)
    check_parts(split, source)
    return split


def check_parts(split: TuneSplit, source: str | None) -> None:
    from ..data.records import CLASS_NAMES

    for name in PARTS:
        counts = class_counts(split.part(name))
        for key, count in counts.items():
            if count < MIN_PER_PART:
                raise DataError(
                    f"after the split by {split.group_by}s, the {name} part holds {count} record(s) of class {key} "
                    f"({CLASS_NAMES[key]}); tune needs at least {MIN_PER_PART} of each class in each part",
                    path=source, hint="add records (some 30 harmful and 30 harmless ones at least; the bundled "
                                      "set's train split has 190 of each), or change --shares")


# ------------------------------------------------------------------------------ candidates
MODE_RANK = {"regap": 0, "fixed": 1, "regap-seq": 2}
STRENGTHS = ((0.5, 0.5), (0.75, 0.75), (0.75, 1.0), (1.0, 1.0))  # (alpha0, alpha_max)
TAUS = (0.3, 0.5, 0.7)
SHARPNESS = (1.0, 4.0)
GATE_READS = ("refusal", "discriminant")
FIXED_STRENGTHS = (0.5, 0.75, 1.0)
# What a candidate's options are compared with to count its changes (gate_read: calibrate's default).
COMPARED = ("mode", "probe_band", "adaptive_band", "alpha0", "alpha_max", "tau", "gate_sharpness", "positions")


@dataclass(frozen=True)
class Candidate:
    """One operating point: resolved options and what the gate reads."""

    options: RegapOptions
    gate_read: str = "refusal"

    def changes(self, default: "Candidate") -> list[str]:
        """The options that differ from ``default`` (calibrate's defaults), in a fixed order; options a
        mode does not use are not counted (fixed has no gate and no probe strength)."""
        used = set(COMPARED) if self.options.mode != "fixed" else {"mode", "probe_band", "adaptive_band",
                                                                    "alpha_max", "positions"}
        out = [name for name in COMPARED if name in used and getattr(self.options, name) != getattr(default.options, name)]
        if self.options.mode != "fixed" and self.gate_read != default.gate_read:
            out.append("gate_read")
        return out

    def simplicity(self, default: "Candidate") -> tuple:
        """Smaller is simpler: options changed, then the mode, then the gate's read, then the name."""
        return (len(self.changes(default)), MODE_RANK[self.options.mode], self.gate_read != "refusal", self.name)

    @property
    def name(self) -> str:
        o = self.options
        parts = [o.mode, f"probe {o.probe_band.start}:{o.probe_band.end}",
                 f"adaptive {o.adaptive_band.start}:{o.adaptive_band.end}"]
        if o.mode == "fixed":
            parts.append(f"alpha {o.alpha_max:g}")
        else:
            parts += [f"alpha0 {o.alpha0:g}", f"alpha_max {o.alpha_max:g}", f"tau {o.tau:g}",
                      f"sharpness {o.gate_sharpness:g}", f"read {self.gate_read}"]
        if o.positions != RegapOptions.positions:
            parts.append(f"positions {o.positions}")
        return ", ".join(parts)

    def described(self, default: "Candidate") -> str:
        """The name shortened to what differs from the default ("the default" when nothing does)."""
        changed = self.changes(default)
        if not changed:
            return "the default (regap, calibrate's options)"
        o = self.options
        words = {"mode": o.mode, "probe_band": f"probe band {o.probe_band.start}:{o.probe_band.end}",
                 "adaptive_band": f"adaptive band {o.adaptive_band.start}:{o.adaptive_band.end}",
                 "alpha0": f"alpha0 {o.alpha0:g}", "alpha_max": f"alpha_max {o.alpha_max:g}",
                 "tau": f"tau {o.tau:g}", "gate_sharpness": f"gate sharpness {o.gate_sharpness:g}",
                 "positions": f"positions {o.positions}", "gate_read": f"gate read {self.gate_read}"}
        return ", ".join(words[name] for name in changed)

    def to_json(self) -> dict[str, Any]:
        import json

        return {"name": self.name, "options": json.loads(self.options.to_json()), "gate_read": self.gate_read}

    @property
    def probe_key(self) -> tuple:
        """What the gate's fit depends on beyond the read and tau: the probe pass's correction (the
        probe band's layers subtract drift increments of earlier probe layers only)."""
        o = self.options
        return (o.probe_band, o.alpha0, o.positions)


def default_candidate(num_layers: int) -> Candidate:
    return Candidate(RegapOptions().resolved(num_layers))


def band_choices(num_layers: int) -> list[tuple[Band, Band]]:
    """(probe band, adaptive band) pairs the search tries, as fractions of the depth L: the default
    ([L/4, L/2) then [L/2, 3L/4)); a late adaptive band ([L/4, L/2) then [7L/10, L)); and two later
    reads, the probe band running to 2L/3 or 5L/6 and the adaptive band from there to L (regap-seq
    reads its score at the last probe layer). Invalid or repeated pairs are dropped."""
    L = num_layers
    quarter, half = L // 4, L // 2
    raw = [(Band(quarter, half), Band(half, (3 * L) // 4)),
           (Band(quarter, half), Band(max(half, (7 * L) // 10), L)),
           (Band(quarter, (2 * L) // 3), Band((2 * L) // 3, L)),
           (Band(quarter, (5 * L) // 6), Band((5 * L) // 6, L))]
    out: list[tuple[Band, Band]] = []
    for probe, adaptive in raw:
        valid = 0 <= probe.start < probe.end <= adaptive.start < adaptive.end <= L
        if valid and (probe, adaptive) not in out:
            out.append((probe, adaptive))
    return out


def candidate_grid(num_layers: int) -> list[Candidate]:
    """Every candidate, the default first. regap and regap-seq: each band pair x (alpha0, alpha_max)
    x tau x gate sharpness x gate read; fixed: each band pair x strength; and the default's gate
    with the correction on every image position (positions ``image``) at two strengths.
    Candidates whose corrections would be the same (fixed with the same corrected layers) are kept
    once, the first (simplest) of them."""
    default = default_candidate(num_layers)
    out = [default]
    seen = {_behaviour_key(default)}

    def add(candidate: Candidate) -> None:
        key = _behaviour_key(candidate)
        if key not in seen:
            seen.add(key)
            out.append(candidate)

    for mode in ("regap", "regap-seq"):
        for (probe, adaptive), (a0, amax), tau, sharp, read in itertools.product(
                band_choices(num_layers), STRENGTHS, TAUS, SHARPNESS, GATE_READS):
            add(Candidate(dataclasses.replace(default.options, mode=mode, probe_band=probe, adaptive_band=adaptive,
                                              alpha0=a0, alpha_max=amax, tau=tau, gate_sharpness=sharp), read))
    for (probe, adaptive), amax in itertools.product(band_choices(num_layers), FIXED_STRENGTHS):
        add(Candidate(dataclasses.replace(default.options, mode="fixed", probe_band=probe, adaptive_band=adaptive,
                                          alpha_max=amax)))
    for a0, amax in STRENGTHS[:2]:
        add(Candidate(dataclasses.replace(default.options, alpha0=a0, alpha_max=amax, positions="image")))
    return sorted(out, key=lambda c: c.simplicity(default))


def _behaviour_key(candidate: Candidate) -> tuple:
    o = candidate.options
    if o.mode == "fixed":
        layers = tuple(o.probe_band.layers() + o.adaptive_band.layers())
        return ("fixed", layers, o.alpha_max, o.positions)
    return (candidate.name,)


# ---------------------------------------------------------------------------- the proxy
def fit_threshold(scores: Sequence[float], refused: Sequence[bool]) -> float:
    """The log-odds threshold that best separates refused from answered rows (the largest
    TPR - FPR of "score > threshold"; ties: the threshold nearest 0), midway between two observed
    scores; 0 (P = 0.5) when one of the two outcomes is missing."""
    scores = [float(s) for s in scores]
    refused = [bool(r) for r in refused]
    positives = sum(refused)
    negatives = len(refused) - positives
    if positives == 0 or negatives == 0:
        return 0.0
    values = sorted(set(scores))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1.0]

    def separation(threshold: float) -> float:
        tpr = sum(s > threshold for s, r in zip(scores, refused) if r) / positives
        fpr = sum(s > threshold for s, r in zip(scores, refused) if not r) / negatives
        return tpr - fpr

    return max(cuts, key=lambda t: (round(separation(t), 12), -abs(t)))


def proxy_quality(scores: Sequence[float], refused: Sequence[bool], threshold: float) -> dict[str, Any]:
    """How well the proxy predicts generated refusal: the AUROC of the log-odds (None without
    both outcomes) and the share of rows where "log-odds > threshold" agrees with the reply."""
    import torch

    from ..calibration.geometry import auroc

    scores = [float(s) for s in scores]
    refused = [bool(r) for r in refused]
    pos = torch.tensor([s for s, r in zip(scores, refused) if r], dtype=torch.float64)
    neg = torch.tensor([s for s, r in zip(scores, refused) if not r], dtype=torch.float64)
    agree = sum((s > threshold) == r for s, r in zip(scores, refused))
    return {"n": len(scores), "refused": int(sum(refused)),
            "auroc": auroc(pos, neg) if len(pos) and len(neg) else None,
            "agreement": agree / len(scores) if scores else None}


# ----------------------------------------------------------------------------- figures
def refusal_figures(decisions: Sequence[bool], default: Sequence[bool] | None = None) -> dict[str, Any]:
    """A refusal count with its rate and 95 % Wilson interval; with the default's decisions on the
    same records, the records refused by one of the two only and the exact McNemar p."""
    decisions = [bool(d) for d in decisions]
    if not decisions:
        raise ValueError("no decisions")
    paired = paired_refusals([(d, d if default is None else bool(e)) for d, e in
                              zip(decisions, default if default is not None else decisions)],
                             ("candidate", "default"))
    out = {"refused": sum(decisions), "n": len(decisions), "rate": paired["refusal_candidate"],
           "ci95": paired["refusal_candidate_ci95"]}
    if default is not None:
        if len(default) != len(decisions):
            raise ValueError("the default's decisions cover other records")
        out["vs_default"] = {"refused_only_candidate": paired["refused_only_candidate"],
                             "refused_only_default": paired["refused_only_default"],
                             "mcnemar_p": paired["mcnemar_p"]}
    return out


# ------------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Judged:
    """What the rule reads of one candidate: harmful and harmless image refusals on the same
    records, whether its text replies equal the uncorrected ones, and its simplicity key."""

    harmful: int
    harmless: int
    n_harmless: int
    text_identical: bool
    simplicity: tuple


def within_budget(judged: Judged, text_harmless_rate: float, budget: float) -> bool:
    # A count comparison, so that a rate like 0.1 + 0.03 rounding to 0.13000000000000003 decides nothing.
    allowed = round((text_harmless_rate + budget) * judged.n_harmless, 9)
    return judged.text_identical and judged.harmless <= allowed


def choose(judged: Sequence[Judged], *, text_harmless_rate: float, budget: float) -> tuple[int, bool]:
    """The rule (``RULE``): the index of the chosen candidate, and whether it met the budget.
    When none does, the one with the fewest harmless refusals (``FALLBACK_RULE``)."""
    if not judged:
        raise ValueError("no candidates")
    feasible = [i for i, j in enumerate(judged) if within_budget(j, text_harmless_rate, budget)]
    if feasible:
        return min(feasible, key=lambda i: (-judged[i].harmful, judged[i].simplicity)), True
    return min(range(len(judged)), key=lambda i: (judged[i].harmless, -judged[i].harmful, judged[i].simplicity)), False


def ranked(judged: Sequence[Judged], *, text_harmless_rate: float, budget: float) -> list[int]:
    """Every index in the rule's order of preference: within budget first (most harmful refused,
    then simpler), then the rest (fewest harmless refused, then most harmful, then simpler)."""
    def key(i: int) -> tuple:
        j = judged[i]
        if within_budget(j, text_harmless_rate, budget):
            return (0, -j.harmful, j.simplicity)
        return (1, j.harmless, -j.harmful, j.simplicity)

    return sorted(range(len(judged)), key=key)
