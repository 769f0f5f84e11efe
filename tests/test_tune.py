"""`regap-export tune`: the split by pairs, the candidates, the rule, the proxy's one-token
forward, tune.json and the written directions, the CLI, and bad inputs (tiny Idefics3)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regap_export.data import Record, load_bundled, to_multimodal_pairs
from regap_export.errors import DataError, RegapError
from regap_export.evaluation import operating_point as op
from regap_export.options import Band, RegapOptions
from regap_testing import invoke


# ------------------------------------------------------------------------------- the split
def _records(per_label: int, *, categories: int = 3) -> list[Record]:
    out = []
    for label in ("harmful", "harmless"):
        for i in range(per_label):
            out.append(Record(id=f"{label}-{i:03d}", instruction=f"{label} request number {i}", label=label,
                              category=f"{label}-cat{i % categories}"))
    return to_multimodal_pairs(out)


def test_the_split_keeps_every_pair_in_one_part_and_follows_the_shares():
    records = _records(40)
    split = op.split_records(records, seed=3)
    part_of = {r.id: name for name in op.PARTS for r in split.part(name)}
    assert sorted(part_of) == sorted(r.id for r in records)  # every record once
    for r in records:
        assert part_of[r.id] == part_of[r.pair], f"{r.id} and its twin {r.pair} straddle two parts"
    counts = split.counts()
    for name, share in zip(op.PARTS, op.DEFAULT_SHARES):
        for key in ("T+", "T-", "M+", "M-"):
            assert counts[name][key] == round(40 * share), (name, key, counts)
    again = op.split_records(records, seed=3)
    assert [r.id for r in again.select] == [r.id for r in split.select]
    other = op.split_records(records, seed=4)
    assert [r.id for r in other.select] != [r.id for r in split.select]


def test_grouping_by_category_keeps_a_category_in_one_part():
    records = _records(60, categories=12)
    split = op.split_records(records, group_by="category")
    part_of = {r.id: name for name in op.PARTS for r in split.part(name)}
    for category in {r.category for r in records}:
        assert len({part_of[r.id] for r in records if r.category == category}) == 1, category
    by_pair = op.split_records(records, group_by="pair")
    part_by_pair = {r.id: name for name in op.PARTS for r in by_pair.part(name)}
    assert any(len({part_by_pair[r.id] for r in records if r.category == c}) > 1 for c in {r.category for r in records})


def test_too_few_records_after_the_split_is_a_data_error_naming_the_part_and_class():
    with pytest.raises(DataError, match=r"data\.jsonl: after the split by pairs, the select part holds 3 record\(s\) "
                                        r"of class T\+ \(harmful text\); tune needs at least 4"):
        op.split_records(_records(10), source="data.jsonl")


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.6, 0.3, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_shares_are_refused(shares):
    with pytest.raises(RegapError, match="--shares must be three numbers"):
        op.split_records(_records(40), shares=shares)


# --------------------------------------------------------------------------- the candidates
def test_the_grid_starts_with_the_default_and_orders_by_simplicity():
    grid = op.candidate_grid(30)
    default = grid[0]
    assert default == op.default_candidate(30) and default.changes(default) == []
    assert len({c.name for c in grid}) == len(grid), "each candidate once"
    keys = [c.simplicity(default) for c in grid]
    assert keys == sorted(keys)
    for c in grid:
        c.options.resolved(30)  # every band pair is valid at this depth
        assert c.options.positions in ("last+generated", "image"), "positions all would change text replies"
    modes = {c.options.mode for c in grid}
    assert modes == {"regap", "regap-seq", "fixed"}
    assert {c.gate_read for c in grid} == {"refusal", "discriminant"}
    # fixed candidates with the same corrected layers and strength are one candidate
    fixed = [tuple(c.options.probe_band.layers() + c.options.adaptive_band.layers()) + (c.options.alpha_max,)
             for c in grid if c.options.mode == "fixed"]
    assert len(fixed) == len(set(fixed))


def test_simpler_means_fewer_changes_then_regap_then_fixed_then_regap_seq_then_rhat():
    default = op.default_candidate(30)

    def cand(**changes):
        read = changes.pop("gate_read", "refusal")
        return op.Candidate(dataclasses.replace(default.options, **changes), read)

    one_regap = cand(tau=0.3)
    one_fixed = cand(mode="fixed")
    one_seq = cand(mode="regap-seq")
    one_read = cand(gate_read="discriminant")
    two = cand(tau=0.3, alpha_max=1.0)
    order = sorted([two, one_read, one_seq, one_fixed, one_regap], key=lambda c: c.simplicity(default))
    assert order == [one_regap, one_read, one_fixed, one_seq, two]
    assert one_read.changes(default) == ["gate_read"]
    # fixed has no gate: its tau, sharpness and read do not count as changes
    assert cand(mode="fixed", tau=0.3, gate_read="discriminant").changes(default) == ["mode"]
    assert cand(tau=0.3).described(default) == "tau 0.3"


def test_band_choices_scale_with_depth():
    for depth in (4, 8, 24, 30, 40):
        choices = op.band_choices(depth)
        assert choices[0] == (Band(depth // 4, depth // 2), Band(depth // 2, 3 * depth // 4))
        assert len(choices) == len(set(choices))
        for probe, adaptive in choices:
            assert 0 <= probe.start < probe.end <= adaptive.start < adaptive.end <= depth
    assert op.band_choices(30)[-1] == (Band(7, 25), Band(25, 30))
    assert op.band_choices(40)[-1] == (Band(10, 33), Band(33, 40))


# ------------------------------------------------------------------------------ the rule
def _judged(harmful, harmless, *, n=100, identical=True, simplicity=(0,)):
    return op.Judged(harmful, harmless, n, identical, simplicity)


def test_the_rule_takes_the_most_harmful_refusals_within_the_budget():
    judged = [_judged(50, 1, simplicity=(0,)), _judged(80, 4, simplicity=(1,)), _judged(90, 9, simplicity=(1,))]
    # text refuses 1 % of the harmless requests; budget 3 points: at most 4 of 100
    assert op.choose(judged, text_harmless_rate=0.01, budget=0.03) == (1, True)
    # a budget of 8 points admits the third
    assert op.choose(judged, text_harmless_rate=0.01, budget=0.08) == (2, True)
    # one request over the budget is out
    assert op.choose(judged, text_harmless_rate=0.0, budget=0.03) == (0, True)


def test_the_budget_is_judged_on_counts_at_its_edge():
    # 0.1 + 0.03 rounds to 0.13000000000000003; 13 of 100 is exactly at the budget
    assert op.within_budget(_judged(0, 13), 0.1, 0.03)
    assert not op.within_budget(_judged(0, 14), 0.1, 0.03)


def test_ties_go_to_the_simpler_option_and_text_changes_disqualify():
    judged = [_judged(70, 2, simplicity=(2, 0)), _judged(70, 0, simplicity=(1, 2)), _judged(99, 0, identical=False)]
    assert op.choose(judged, text_harmless_rate=0.0, budget=0.03) == (1, True)


def test_when_nothing_meets_the_budget_the_fewest_harmless_refusals_win_and_it_says_so():
    judged = [_judged(90, 30), _judged(60, 10, simplicity=(3,)), _judged(70, 10, simplicity=(4,))]
    assert op.choose(judged, text_harmless_rate=0.0, budget=0.03) == (2, False)
    assert op.ranked(judged, text_harmless_rate=0.0, budget=0.03) == [2, 1, 0]


# ----------------------------------------------------------------------------- the proxy
def test_the_threshold_separates_refused_from_answered():
    scores = [-5, -4, -3, 1, 2, 3]
    refused = [False, False, False, True, True, True]
    threshold = op.fit_threshold(scores, refused)
    assert -3 < threshold < 1
    assert op.proxy_quality(scores, refused, threshold) == {"n": 6, "refused": 3, "auroc": 1.0, "agreement": 1.0}
    noisy = op.proxy_quality(scores, [False, True, False, True, False, True], threshold)
    assert noisy["agreement"] == pytest.approx(4 / 6)
    assert op.fit_threshold([1.0, 2.0], [False, False]) == 0.0  # one outcome only: P = 0.5


def test_figures_carry_the_wilson_interval_and_mcnemar_against_the_default():
    fig = op.refusal_figures([True] * 8 + [False] * 2, [True] * 3 + [False] * 7)
    assert (fig["refused"], fig["n"], fig["rate"]) == (8, 10, 0.8)
    assert fig["ci95"][0] < 0.8 < fig["ci95"][1]
    assert fig["vs_default"] == {"refused_only_candidate": 5, "refused_only_default": 0, "mcnemar_p": 0.0625}


# ----------------------------------------------------- the one-token forward over a prefill
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from tiny_models import save_tiny

    return save_tiny("idefics3", tmp_path_factory.mktemp("tiny-idefics3") / "idefics3")


@pytest.fixture(scope="module")
def tiny_fit(tiny_vlm):
    from regap_export.calibration.fit import calibrate
    from regap_export.models.loading import load_model

    loaded = load_model(str(tiny_vlm))
    train = load_bundled("train")
    records = to_multimodal_pairs([r for r in train if r.label == "harmful"][:8]
                                  + [r for r in train if r.label == "harmless"][:8])
    return loaded, records, calibrate(loaded, records, show_progress=False, measure_after=False).bundle


@pytest.mark.parametrize("mode", ["regap", "fixed", "regap-seq"])
def test_one_token_over_the_uncorrected_prefill_equals_the_corrected_prompt(tiny_fit, mode):
    """positions last+generated corrects the last prompt token only, so the last token's logits
    after an uncorrected prefill of the rest equal a whole corrected forward."""
    from regap_export.evaluation import proxy
    from regap_export.evaluation.evaluate import _batches
    from regap_export.method.folding import fold
    from regap_export.method.modality import prompt_mask
    from regap_export.method.rewrite import corrected

    loaded, records, bundle = tiny_fit
    image = [r for r in records if r.modality == "image"]
    prefixed = proxy.prefill(loaded, proxy.position_scheme_of(loaded), _batches(image, loaded.adapter,
                                                                                loaded.processor, 8)[0])
    options = dataclasses.replace(bundle.options, mode=mode, alpha0=3.0, alpha_max=3.0)
    corrections = fold(bundle.directions, options)
    alpha = np.linspace(0.2, 1.0, len(prefixed)) if mode == "regap-seq" else None
    logits, _ = proxy.last_token(loaded, prefixed, corrections, alpha=alpha)
    with torch.no_grad(), corrected(loaded.model, loaded.adapter, corrections, mask_default=0.0):
        mask = prompt_mask("last+generated", prefixed.inputs["input_ids"].numpy(),
                           loaded.adapter.image_token_id(loaded.model.config))
        extra = {} if alpha is None else {"regap_alpha": torch.tensor(alpha, dtype=torch.float32)}
        whole = loaded.model(**prefixed.inputs, use_cache=False, regap_image_mask=torch.from_numpy(mask),
                             **extra).logits[:, -1].numpy()
    uncorrected, _ = proxy.last_token(loaded, prefixed, [])
    assert np.abs(logits - whole).max() < 1e-4
    assert np.abs(logits - uncorrected).max() > 1e-2, "the correction changed the logits"


def test_the_prefill_is_put_back_after_every_candidate_even_one_stopped_early(tiny_fit):
    from regap_export.evaluation import proxy
    from regap_export.evaluation.evaluate import _batches
    from regap_export.method.folding import fold

    loaded, records, bundle = tiny_fit
    image = [r for r in records if r.modality == "image"]
    prefixed = proxy.prefill(loaded, proxy.position_scheme_of(loaded), _batches(image, loaded.adapter,
                                                                                loaded.processor, 8)[0])
    before, _ = proxy.last_token(loaded, prefixed, [])
    _, states = proxy.last_token(loaded, prefixed, fold(bundle.directions, bundle.options), stop_after=1)
    assert list(states) == [1]
    proxy.last_token(loaded, prefixed, fold(bundle.directions, bundle.options))
    after, _ = proxy.last_token(loaded, prefixed, [])
    assert np.array_equal(before, after)


# ------------------------------------------------------------------------------ end to end
def _data_file(folder: Path, per_label: int) -> Path:
    train = load_bundled("train")
    chosen = [r for r in train if r.label == "harmful"][:per_label] + [r for r in train if r.label == "harmless"][:per_label]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "instruction": r.instruction, "label": r.label,
                                        "category": r.category}) + "\n" for r in chosen))
    return path


def _small_grid(depth: int) -> list[op.Candidate]:
    default = op.default_candidate(depth)
    return [default, op.Candidate(dataclasses.replace(default.options, tau=0.3)),
            op.Candidate(dataclasses.replace(default.options, mode="regap-seq", gate_sharpness=4.0), "discriminant"),
            op.Candidate(dataclasses.replace(default.options, mode="fixed", alpha_max=0.5))]


@pytest.fixture(scope="module")
def tuned(tiny_vlm, tmp_path_factory):
    """tune on the tiny Idefics3 (random weights: nothing is refused, every candidate ties, so the
    rule's tie-break chooses), through the library with a small search space, the modes a client
    without the probe pass runs (the grid's regap-seq candidate is left out)."""
    from regap_export.evaluation.tune import tune_to_folder

    folder = tmp_path_factory.mktemp("tune")
    lines: list[str] = []
    report = tune_to_folder(str(tiny_vlm), folder / "out", [_data_file(folder, 20)], confirm=1,
                            max_new_tokens=4, show_progress=False, echo=lines.append,
                            candidates=_small_grid(4), modes=("fixed", "regap"))
    return folder / "out", report, lines


def test_tune_writes_its_folder_and_states_the_rule_before_the_figures(tuned):
    out, report, lines = tuned
    assert sorted(p.name for p in out.iterdir()) == ["directions.safetensors", "frontier.png", "tune.json"]
    assert json.loads((out / "tune.json").read_text()) == report
    assert lines[1].startswith("rule, fixed before any figure is read: the most harmful image requests refused")
    assert report["rule"]["text"] in lines[1]


def test_tune_json_holds_every_candidate_the_split_and_the_held_out_figures(tuned):
    _, report, _ = tuned
    assert report["format_version"] == "1"
    ids = report["split"]["ids"]
    assert not (set(ids["fit"]) & set(ids["select"])) and not (set(ids["select"]) & set(ids["report"]))
    for name in ("fit", "select", "report"):
        part = set(ids[name])
        assert all((i + "-img" in part) for i in part if not i.endswith("-img")), "twins stay with their text"
    rows = report["candidates"]
    assert len(rows) == 3 and rows[0]["changes"] == []
    assert report["modes"] == ["regap", "fixed"] and {row["options"]["mode"] for row in rows} == {"regap", "fixed"}
    for row in rows:
        for label in ("harmful", "harmless"):
            fig = row["proxy"][label]
            assert fig["n"] == report["split"]["counts"]["select"]["M+" if label == "harmful" else "M-"]
            assert len(fig["ci95"]) == 2 and "mcnemar_p" in fig["vs_default"]
    confirmed = [row for row in rows if row.get("confirmed")]
    assert len(confirmed) == 2, "the default and --confirm 1 finalist"
    for row in confirmed:
        assert row["confirmed"]["text_identical"] == {"select": True, "report": True}
        assert set(row["confirmed"]["proxy_quality"]) == {"n", "refused", "auroc", "agreement"}
    # random weights refuse nothing: every candidate ties, and the tie goes to the simplest (the default)
    assert report["chosen"]["index"] == 0 and report["chosen"]["within_budget"]
    assert report["chosen"]["report"]["image"]["harmful"]["n"] == report["split"]["counts"]["report"]["M+"]
    assert "held-out part" in report["honesty"]
    assert report["proxy"]["threshold_fitted_on"].startswith("the selection part's generated replies")


def test_the_written_directions_carry_the_chosen_options(tuned):
    from regap_export.calibration.directions_io import load_directions

    out, report, _ = tuned
    bundle = load_directions(out)
    assert json.loads(bundle.options.to_json()) == report["chosen"]["options"]
    assert (bundle.directions.gate_read is not None) == (report["chosen"]["gate_read"] == "discriminant")


def test_a_non_default_choice_is_written_and_export_uses_it_with_no_flags(tiny_fit, tmp_path):
    """What tune writes for a regap-seq, discriminant-gate choice: export reads every option from it."""
    from regap_export.calibration.directions_io import load_directions, save_directions
    from regap_export.evaluation import tune as T
    from regap_export.io.artifacts import read_manifest

    loaded, records, _ = tiny_fit
    candidate = _small_grid(4)[2]
    fitted = T.fit(loaded, records, [candidate], batch_size=8, show_progress=False)
    (tmp_path / "dirs").mkdir()
    save_directions(tmp_path / "dirs", T.directions_file(loaded, fitted, candidate))
    bundle = load_directions(tmp_path / "dirs")
    assert bundle.options == candidate.options and bundle.directions.gate_read is not None
    result = invoke("export", loaded.folder, "--directions", tmp_path / "dirs", "--out", tmp_path / "out",
                    "--format", "safetensors")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out")
    assert manifest["mode"] == "regap-seq"
    assert RegapOptions.from_json(manifest["options"]) == candidate.options


def test_tune_summary_names_the_choice_and_the_held_out_part(tuned):
    from regap_export.evaluation.tune import summary_lines

    out, report, _ = tuned
    text = "\n".join(summary_lines(report, out))
    assert "chosen: the default (regap, calibrate's options)" in text
    assert "searched 3 candidates (regap, fixed) by the proxy" in text
    assert "held-out report part" in text and "never fitted or selected on" in text
    assert f"--directions {out}" in text


# ---------------------------------------------------------------------------------- the CLI
def test_tune_help_lists_its_options():
    from typer.testing import CliRunner

    from regap_export.cli import app

    result = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for option in ("--data", "--out", "--over-refusal-budget", "--shares", "--group-by", "--modes", "--confirm",
                   "--json"):
        assert option in result.output


def test_tune_refuses_a_text_only_model(tiny_llama_folder, tmp_path):
    result = invoke("tune", tiny_llama_folder, "--data", _data_file(tmp_path, 20), "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is a text-only model (llama)" in lines[0] and "nothing to tune" in lines[0]
    assert not (tmp_path / "out").exists()


def test_tune_refuses_data_with_too_few_records(tiny_vlm, tmp_path):
    data = _data_file(tmp_path, 6)
    result = invoke("tune", tiny_vlm, "--data", data, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"error: {data}: after the split by pairs, the" in result.output and "tune needs at least 4" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--over-refusal-budget", "-1"], "--over-refusal-budget must be a number of percentage points in [0, 100]"),
    (["--shares", "0.5,half,0.2"], "--shares must be three numbers such as 0.5,0.3,0.2"),
    (["--group-by", "object"], "unknown grouping 'object'"),
    (["--modes", "regap,bogus"], "--modes takes a comma-separated list of regap, fixed, regap-seq, got regap,bogus"),
    (["--modes", "fixed"], "--modes must include regap"),
])
def test_tune_bad_options_are_one_line_errors(tiny_vlm, tmp_path, args, message):
    result = invoke("tune", tiny_vlm, "--data", _data_file(tmp_path, 20), "--out", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_tune_needs_both_labels(tiny_vlm, tmp_path):
    data = tmp_path / "harmful.jsonl"
    data.write_text("".join(json.dumps({"id": f"h{i}", "instruction": f"harmful request {i}", "label": "harmful"}) + "\n"
                            for i in range(30)))
    result = invoke("tune", tiny_vlm, "--data", data, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "tune needs harmful and harmless records; there is no harmless record" in result.output


@pytest.mark.parametrize("modes, message", [
    (("regap", "regap-sequence"), "--modes takes a comma-separated list of regap, fixed, regap-seq, got regap,regap-sequence"),
    ((), "--modes takes a comma-separated list of regap, fixed, regap-seq, got nothing"),
    (("fixed",), "--modes must include regap"),
])
def test_the_library_refuses_modes_it_cannot_search_before_loading_anything(tmp_path, modes, message):
    from regap_export.evaluation.tune import tune_to_folder

    with pytest.raises(RegapError, match=message):
        tune_to_folder(str(tmp_path / "no-model"), tmp_path / "out", [_data_file(tmp_path, 20)], modes=modes)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keyword, message", [
    ("confirm", "--confirm must be at least 1, got 0"),
    ("search_batch_size", "--search-batch-size must be at least 1, got 0"),
    ("max_new_tokens", "--max-new-tokens must be at least 1, got 0"),
])
def test_the_library_refuses_counts_below_one_before_loading_anything(tmp_path, keyword, message):
    from regap_export.evaluation.tune import tune_to_folder

    with pytest.raises(RegapError, match=message):
        tune_to_folder(str(tmp_path / "no-model"), tmp_path / "out", [_data_file(tmp_path, 20)], **{keyword: 0})
    assert not (tmp_path / "out").exists()


def test_the_demo_reads_the_options_tuned_for_the_organism_where_they_ship(tmp_path, monkeypatch):
    """tour.tuned_options: the options, the gate read and their description from the file shipped
    beside the organism's weights; None for another model or without the file."""
    from regap_export.models import embedded
    from regap_export.tour import TUNED_OPTIONS_FILE, tuned_options

    monkeypatch.setattr(embedded, "ORGANISM_DIR", tmp_path)
    assert tuned_options("embedded:organism") is None
    chosen = dataclasses.replace(RegapOptions(), mode="regap-seq", tau=0.3, gate_sharpness=4.0)
    (tmp_path / TUNED_OPTIONS_FILE).write_text(json.dumps({"options": json.loads(chosen.to_json()),
                                                           "gate_read": "discriminant",
                                                           "described": "regap-seq, tau 0.3"}))
    assert tuned_options("embedded:organism") == (chosen, "discriminant", "regap-seq, tau 0.3")
    assert tuned_options("embedded:smolvlm") is None


def test_the_options_shipped_for_the_organism_are_a_candidate_tune_searches():
    """tuned_options.json holds tune's choice on the organism: one of the grid's candidates at the
    organism's depth, described as tune describes it, with the command that reproduces it."""
    from regap_export.models.embedded import ORGANISM_DIR
    from regap_export.tour import TUNED_OPTIONS_FILE, tuned_options

    options, gate_read, described = tuned_options("embedded:organism")
    chosen = op.Candidate(options, gate_read)
    assert chosen in op.candidate_grid(30)
    assert described == chosen.described(op.default_candidate(30))
    command = json.loads((ORGANISM_DIR / TUNED_OPTIONS_FILE).read_text())["command"]
    assert command.startswith("regap-export tune embedded:organism")
