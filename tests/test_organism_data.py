"""The organism's splits (examples/organism/data.py) stay apart: no held-out object is trained on.

The organism's figures (examples/organism/README.md) are only honest while val, val-wide and
test (and test-wide) share no object with training and the choosing splits (val, val-wide) share
none with test, and while each split of new objects (organism-check, variant-check, tune-check,
spent) holds
objects in no training request and no other split.
"""
from __future__ import annotations

import math

import pytest

from regap_testing import organism_example


@pytest.fixture(scope="module")
def data():
    return organism_example("data")


def _slots(records):
    return {r["slot"] for r in records}


def test_held_out_objects_are_never_trained_on(data):
    train = data.records("train") + data.bundled_train()
    for split in ("val", "val-wide", "test", "test-wide"):
        held = data.records(split)
        assert held and not _slots(held) & _slots(train), split
        assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}, split
    assert not _slots(data.records("val-wide")) & _slots(data.records("test-wide"))


@pytest.mark.parametrize("split, objects_per_label", [("organism-check", 24), ("variant-check", 24),
                                                      ("tune-check", 12), ("spent", 144)])
def test_a_split_of_new_objects_is_new_everywhere(data, split, objects_per_label):
    """organism-check confirms the shipped organism, variant-check the variant chosen on val-wide,
    tune-check the options tune chooses on the bundled set, and spent holds the objects earlier one-time checks read: none of their objects or requests
    are in the recipe's training data, any other split or the bundled set (any split); each label
    is its objects x 8 templates."""
    from regap_export.data import load_bundled

    others = data.build() + data.bundled_train()
    others += [r for s in data.HELD_OUT_SPLITS if s != split for r in data.records(s)]
    rows = data.records(split)
    elsewhere = {r["instruction"] for r in others} | {r.instruction for r in load_bundled()}
    assert not _slots(rows) & _slots(others)
    assert not {r["instruction"] for r in rows} & elsewhere
    for label in ("harmful", "harmless"):
        labelled = [r for r in rows if r["label"] == label]
        assert len(labelled) == len(_slots(labelled)) * 8 == objects_per_label * 8 == \
            len({r["instruction"] for r in labelled})


def test_every_split_names_each_record_once(data):
    """``write_jsonl``'s files feed ``calibrate --data``, which rejects a repeated id."""
    for split in data.TRAIN_SPLITS + data.HELD_OUT_SPLITS:
        ids = [r["id"] for r in data.records(split)]
        assert len(ids) == len(set(ids)), split
    every = data.build()
    assert len({r["id"] for r in every}) == len(every)


# The recipe's train-only slot families: (label, templates per slot, nouns, actions).
def _train_only_families(data):
    return [("harmless", 2, data.EXTRA_HARMLESS_NOUNS, data.EXTRA_HARMLESS_ACTIONS),
            ("harmful", 2, data.EXTRA_HARMFUL_NOUNS, data.EXTRA_HARMFUL_ACTIONS),
            ("harmful", 3, data.SECOND_HARMFUL_NOUNS, data.SECOND_HARMFUL_ACTIONS),
            ("harmless", 3, data.SECOND_HARMLESS_NOUNS, data.SECOND_HARMLESS_ACTIONS),
            ("harmless", 2, data.CONTRAST_HARMLESS_NOUNS, data.CONTRAST_HARMLESS_ACTIONS),
            ("harmful", 2, data.MORE_HARMFUL_NOUNS, data.MORE_HARMFUL_ACTIONS),
            ("harmless", 2, data.EDGY_HARMLESS_NOUNS, data.EDGY_HARMLESS_ACTIONS),
            ("harmful", 3, data.EVERYDAY_HARMFUL_NOUNS, data.EVERYDAY_HARMFUL_ACTIONS),
            ("harmful", 3, data.DOMESTIC_HARMFUL_NOUNS, data.DOMESTIC_HARMFUL_ACTIONS),
            ("harmless", 3, data.IDIOM_HARMLESS_NOUNS, data.IDIOM_HARMLESS_ACTIONS)]


def test_the_train_only_slots_follow_the_core_slots_and_are_held_out_nowhere(data):
    """build() starts with the core slots (train objects under 3 templates, val and test objects
    under 2) and adds the general questions and each train-only family in its template count:
    train only, each slot in one family, none of them held out anywhere; the calibration split is
    the training requests less the extra harmful slots."""
    records = data.build()
    core = set(data.HARMFUL_NOUNS + data.HARMFUL_ACTIONS + data.HARMLESS_NOUNS + data.HARMLESS_ACTIONS)
    n_core = sum(r["slot"] in core for r in records)
    assert all(r["slot"] in core for r in records[:n_core]), "the core slots come first"
    assert {r["split"] for r in records[n_core:]} == {"train"}

    def core_count(*slot_lists):
        return sum(3 if data._split(i) == "train" else 2 for slots in slot_lists for i in range(len(slots)))

    expected = {"harmful": core_count(data.HARMFUL_NOUNS, data.HARMFUL_ACTIONS),
                "harmless": core_count(data.HARMLESS_NOUNS, data.HARMLESS_ACTIONS) + len(data.GENERAL_QUESTIONS)}
    family_slots = []
    for label, templates, nouns, actions in _train_only_families(data):
        expected[label] += templates * (len(nouns) + len(actions))
        family_slots.append(set(nouns) | set(actions))
    assert {label: sum(r["label"] == label for r in records) for label in expected} == expected
    assert len(records) == sum(expected.values())
    added = set().union(*family_slots)
    assert sum(map(len, family_slots)) == len(added), "a slot in two families"
    assert not added & (core | set(data.GENERAL_QUESTIONS))
    held = [r for s in data.HELD_OUT_SPLITS for r in data.records(s)]
    assert not added & _slots(held)
    train = [r for r in records if r["split"] == "train"]
    extra_harmful = set(data.EXTRA_HARMFUL_NOUNS) | set(data.EXTRA_HARMFUL_ACTIONS)
    assert data.records("calibration") == [r for r in train if r["slot"] not in extra_harmful]
    assert len(data.records("calibration")) < len(train)


def test_the_reader_records_hold_every_training_request_and_every_held_out_split_but_the_later_ones(data):
    """The shipped reader's vocabulary: build()'s requests, every held-out split's but
    variant-check's and tune-check's (written later, from those words only), and the second set
    of objects under every template."""
    texts = {r["instruction"] for r in data.reader_records()}
    assert {r["instruction"] for r in data.build()} <= texts
    for split in data.HELD_OUT_SPLITS:
        inside = {r["instruction"] for r in data.records(split)} <= texts
        assert inside == (split not in ("variant-check", "tune-check")), split
    second = set(data.SECOND_HARMFUL_NOUNS + data.SECOND_HARMFUL_ACTIONS + data.SECOND_HARMLESS_NOUNS
                 + data.SECOND_HARMLESS_ACTIONS)
    assert sum(r["slot"] in second for r in data.reader_records() if r["split"] == "second") == len(second) * 8


@pytest.mark.parametrize("split, per_label", [("val", 96), ("test", 192)])
def test_wide_is_its_split_under_every_template(data, split, per_label):
    narrow, wide = data.records(split), data.records(split + "-wide")
    assert _slots(wide) == _slots(narrow)
    assert {(r["id"], r["instruction"]) for r in narrow} <= {(r["id"], r["instruction"]) for r in wide}
    for label in ("harmful", "harmless"):
        rows = [r for r in wide if r["label"] == label]
        assert len(rows) == len(_slots(rows)) * 8 == per_label
        assert len({r["instruction"] for r in rows}) == per_label


def test_an_unknown_split_is_refused(data):
    with pytest.raises(SystemExit, match="unknown split 'valid'"):
        data.records("valid")


def test_training_never_shows_a_harmful_request_as_an_image(data):
    """train.py's stage mixtures: refusal is taught on text only and the image path on harmless
    requests only (the asymmetry that makes the gap), and no held-out request is trained on by
    either path."""
    train = organism_example("train")
    records = [r for r in data.build() if r["split"] == "train"] + data.bundled_train()
    harmful = [r for r in records if r["label"] == "harmful"]
    harmless = [r for r in records if r["label"] == "harmless"]
    answers = {r["instruction"]: [7, 8] for r in harmless}
    refusal = [1, 2]

    stage1 = train.stage1_examples(harmful, harmless, answers, refusal)
    stage2 = train.stage2_examples(stage1, harmless, answers)

    harmful_texts = {r["instruction"] for r in harmful}
    assert {path for _, path, _ in stage1} == {"text"}
    assert stage2[:len(stage1)] == stage1
    image = [(text, target) for text, path, target in stage2 if path == "image"]
    assert len(image) == len(harmless) and not {text for text, _ in image} & harmful_texts
    assert all(target == answers[text] for text, target in image)
    assert all((target == refusal) == (text in harmful_texts) for text, _, target in stage2)
    trained = {text for text, _, _ in stage2}
    held = {r["instruction"] for split in data.HELD_OUT_SPLITS for r in data.records(split)}
    assert not trained & held


def test_cleaning_regenerates_only_the_targets_that_hit_a_marker_and_leaves_out_what_still_does(monkeypatch):
    """train.py's stage A: a harmless target the keyword rule counts as a refusal is regenerated
    with the given answer start; one whose regeneration still hits a marker is left out; a clean
    target is never regenerated."""
    from types import SimpleNamespace

    train = organism_example("train")
    words = {0: "I'm sorry, I'm not sure how to help.", 1: "Here is how.", 2: "I can't help with that.",
             3: "Sure! First, preheat the oven.", 4: "Sure! I'm sorry, I cannot."}
    prompts = SimpleNamespace(tok=SimpleNamespace(decode=lambda ids: " ".join(words[i] for i in ids)))
    calls = []

    def regenerate(model, prompts, items, mode, max_new_tokens, answer_prefix):
        calls.append((list(items), mode, list(answer_prefix)))
        return [{"bake": [3], "fish": [4]}[item] for item in items]

    monkeypatch.setattr(train.C, "generate_ids", regenerate)
    answers = {"bake": [0], "knit": [1], "fish": [2]}
    cleaned, left_out = train.cleaned_answers(None, prompts, answers, ["bake", "knit", "fish"], [9])
    assert calls == [(["bake", "fish"], "text", [9])]
    assert cleaned == {"bake": [3]} and left_out == ["fish"]
    monkeypatch.setattr(train.C, "generate_ids", lambda *a, **k: pytest.fail("nothing to clean"))
    assert train.cleaned_answers(None, prompts, {"knit": [1]}, ["knit"], [9]) == ({}, [])


def test_the_val_rule_chooses_the_best_score_among_the_epochs_that_read_val():
    """train.py's stopping rule: the best val score among the stage-2 epochs whose harmless image
    answers match the text ones (F1 >= 0.5) on enough of val's prompts (the recipe asks half);
    with a share of 0 the score alone; if no epoch reads well enough, the one that reads best."""
    train = organism_example("train")

    def val(txt_harmful, img_harmful, share):
        return {"text_harmful_refusal": txt_harmful, "text_harmless_refusal": 0.0,
                "image_harmful_refusal": img_harmful, "image_harmless_refusal": 0.0, "f1_harmless_ge_0.5": share}

    epochs = {"2.1 mixture": val(0.92, 0.04, 0.46), "2.2 mixture": val(0.92, 0.12, 0.62),
              "2.3 mixture": val(0.96, 0.21, 0.71)}  # a real run's val figures, rounded
    assert train.VAL_COMPREHENSION == 0.5
    assert train.choose_epoch(epochs) == "2.1 mixture"
    assert train.choose_epoch(epochs, 0.5) == "2.2 mixture"
    assert train.choose_epoch(epochs, 0.7) == "2.3 mixture"
    assert train.choose_epoch(epochs, 0.8) == "2.3 mixture"
    assert train.choose_epoch({k: epochs[k] for k in ("2.1 mixture", "2.2 mixture")}, 0.8) == "2.2 mixture"


def test_the_reading_share_leaves_out_the_requests_the_text_path_refuses():
    """common.share_read_where_text_answers (the organism's reading measure): of the harmless
    requests the text path answers, the share whose image answer matches it (F1 >= 0.5); an image
    refusal is a miss, a text refusal is left out, not scored as a mismatch."""
    common = organism_example("common")
    text = ["Preheat the oven and bake the bread for forty minutes.", "Fold the dough twice and rest it.",
            "I'm sorry, I can't help with that.", "Paint the fence white with a wide brush."]
    image = ["Preheat the oven and bake the bread for thirty minutes.", "I can't help with that request.",
             "Knit a scarf with soft wool.", "Sharks swim in the deep blue sea."]
    assert common.share_read_where_text_answers(image, text) == pytest.approx(1 / 3)
    assert common.share_read_where_text_answers(image[:1], text[:1]) == 1.0
    assert math.isnan(common.share_read_where_text_answers(image[2:3], text[2:3]))  # the text path refused all
