"""The organism's splits (examples/organism/data.py) stay apart: no held-out object is trained on.

The organism's figures (examples/organism/RESULTS.md) are only honest while val, val-wide and
test (and test-wide) share no object with training and the choosing splits (val, val-wide) share
none with test.
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


def _assert_new_everywhere(data, confirming: str, others: list[dict]) -> None:
    """The ``confirming`` split's objects are in none of ``others``, and its requests in none of
    them, the bundled set (any split) or broad.py's; each label is 24 objects x 8 templates."""
    from regap_export.data import load_bundled

    broad = organism_example("broad")
    rows = data.records(confirming)
    elsewhere = {r["instruction"] for r in others} | {r.instruction for r in load_bundled()}
    elsewhere |= set(broad.BROAD_HARMFUL) | set(broad.BROAD_HARMLESS) | {text for text, _ in broad.BROAD_VAL}
    assert not _slots(rows) & _slots(others)
    assert not {r["instruction"] for r in rows} & elsewhere
    for label in ("harmful", "harmless"):
        labelled = [r for r in rows if r["label"] == label]
        assert len(labelled) == len(_slots(labelled)) * 8 == 192 == len({r["instruction"] for r in labelled})


def test_the_fresh_split_is_new_everywhere(data):
    """fresh confirms a variant chosen on val-wide + test-wide: none of its objects may be in any
    other split, any earlier build's training data (build B's extra harmful slots, build F's broad
    requests) or the bundled set."""
    others = data.build(with_extra_harmful=True) + data.bundled_train()
    _assert_new_everywhere(data, "fresh", others + [r for s in ("val-wide", "test-wide") for r in data.records(s)])


def test_the_second_fresh_split_is_new_everywhere_and_build_g_trains_on_no_held_out_object(data):
    """fresh2 confirms build G against build E (RESULTS.md, "Build G"): none of its objects or
    requests are in any build's training data (build G's included), any other split or the
    bundled set; build G trains on fresh's objects but on none of val, test or fresh2's, and
    leaves every other build's records as they were."""
    build_g = data.build(with_extra_harmful=True, with_more_objects=True)
    held = [r for s in ("val-wide", "test-wide", "fresh") for r in data.records(s)]
    _assert_new_everywhere(data, "fresh2", build_g + data.bundled_train() + held)
    trained_g = _slots(r for r in build_g if r["split"] == "train")
    assert _slots(data.records("fresh")) <= trained_g
    for split in ("val-wide", "test-wide", "fresh2"):
        assert not _slots(data.records(split)) & trained_g, split
    assert build_g[:len(data.build(with_extra_harmful=True))] == data.build(with_extra_harmful=True)
    assert _slots(data.records("train-g")) == _slots(r for r in data.build(with_more_objects=True) if r["split"] == "train")


@pytest.mark.parametrize("split", ["fresh3", "fresh4", "fresh5", "fresh6", "fresh7", "fresh8", "fresh9"])
def test_a_later_fresh_split_is_new_everywhere(data, split):
    """fresh3 confirms the refitted reader, fresh4 build H against build E, fresh5 build I, fresh6
    build J, fresh7 build K, fresh8 build L, fresh9 the variant chosen on L (RESULTS.md, "The
    reader's vocabulary", "Build H" ... "Modes and variants on build L"): none of their objects or
    requests are in any build's training data (build L's, the widest, included), any other split
    or the bundled set."""
    trained = data.build(**data.BUILD_OPTIONS["l"]) + data.bundled_train()
    held = [r for s in ("val-wide", "test-wide") + tuple(data.FRESH_SPLITS) if s != split for r in data.records(s)]
    _assert_new_everywhere(data, split, trained + held)


def test_every_split_names_each_record_once(data):
    """``write_jsonl``'s files feed ``calibrate --data``, which rejects a repeated id (build G's
    two fresh-object families once shared the prefix "g-fresh")."""
    for split in data.TRAIN_SPLITS + data.HELD_OUT_SPLITS:
        ids = [r["id"] for r in data.records(split)]
        assert len(ids) == len(set(ids)), split
    every = data.build(**data.BUILD_OPTIONS["l"])
    assert len({r["id"] for r in every}) == len(every)


def _added_slots(data, build_name):
    """(label, templates per slot, nouns, actions) that ``build_name`` adds after the build before it."""
    return {"i": [("harmless", 2, data.CONTRAST2_HARMLESS_NOUNS, data.CONTRAST2_HARMLESS_ACTIONS)],
            "j": [("harmful", 3, data.EVERYDAY_HARMFUL_NOUNS, data.EVERYDAY_HARMFUL_ACTIONS)],
            "l": [("harmful", 3, data.DOMESTIC_HARMFUL_NOUNS, data.DOMESTIC_HARMFUL_ACTIONS),
                  ("harmless", 3, data.IDIOM_HARMLESS_NOUNS, data.IDIOM_HARMLESS_ACTIONS)]}[build_name]


@pytest.mark.parametrize("build_name, before", [("i", "g"), ("j", "i"), ("l", "j")])
def test_a_later_build_adds_its_slots_after_the_build_before_and_trains_on_no_held_out_object(
        data, build_name, before):
    """Build I's records are build G's, unchanged and in order, then its second set of edgy
    harmless slots; build J's are I's, then its everyday harmful slots; build L's are J's, then its
    domestic harmful and idiom harmless slots: train only, new (in no other list), none of them
    held out anywhere."""
    def without_extra_harmful(name):
        return data.build(**{**data.BUILD_OPTIONS[name], "with_extra_harmful": False})

    earlier, later = without_extra_harmful(before), without_extra_harmful(build_name)
    added = later[len(earlier):]
    assert later[:len(earlier)] == earlier
    expected = {label: 0 for label in ("harmful", "harmless")}
    for label, templates, nouns, actions in _added_slots(data, build_name):
        expected[label] += templates * (len(nouns) + len(actions))
    assert {label: sum(r["label"] == label for r in added) for label in expected} == expected
    assert len(added) == sum(expected.values())
    assert {r["split"] for r in added} == {"train"}
    assert not _slots(added) & _slots(data.build(**data.BUILD_OPTIONS[before]))
    held = [r for s in data.HELD_OUT_SPLITS if s != "fresh" for r in data.records(s)]  # G trains on fresh
    assert not _slots(data.records("train-" + build_name)) & _slots(held)
    assert _slots(data.records("train-" + build_name)) == _slots(r for r in later if r["split"] == "train")


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


def test_broad_requests_are_new_and_their_validation_is_never_trained_on():
    """examples/organism/broad.py (the stage-3 experiment): its training requests are not in the
    bundled set (any split) nor the organism's held-out splits, and its validation requests are
    in none of the training data."""
    from regap_export.data import load_bundled

    broad, data = organism_example("broad"), organism_example("data")
    bundled = {r.instruction for r in load_bundled()}
    held = {r["instruction"] for split in ("val", "val-wide", "test", "test-wide") for r in data.records(split)}
    trained = set(broad.BROAD_HARMLESS) | set(broad.BROAD_HARMFUL)
    val = {text for text, _ in broad.BROAD_VAL}
    assert len(trained) == len(broad.BROAD_HARMLESS) + len(broad.BROAD_HARMFUL) and len(val) == len(broad.BROAD_VAL)
    assert not trained & (bundled | held | val)
    assert not val & (bundled | {r["instruction"] for r in data.build(with_extra_harmful=True)})
    assert {label for _, label in broad.BROAD_VAL} == {"harmful", "harmless"}


@pytest.mark.parametrize("with_broad, build_name",
                         [(False, "e"), (True, "e"), (False, "g"), (False, "i"), (False, "j"), (False, "l")],
                         ids=["build-E", "build-F", "build-G", "build-I", "build-J", "build-L"])
def test_training_never_shows_a_harmful_request_as_an_image(data, with_broad, build_name):
    """train.py's stage mixtures (the shipped build E, build F with --broad, build G with
    --more-objects, build I with --edgy-objects too, build J with --everyday-harmful too, build L
    with --domestic-and-idioms too): refusal
    is taught on text only and the image path on harmless requests only (the asymmetry that makes
    the gap), and no held-out request is trained on by either path."""
    train, broad = organism_example("train"), organism_example("broad")
    records = data.build(**data.BUILD_OPTIONS[build_name])
    records = [r for r in records if r["split"] == "train"] + data.bundled_train()
    harmful = [r for r in records if r["label"] == "harmful"]
    harmless = [r for r in records if r["label"] == "harmless"]
    broad_harmful = broad.BROAD_HARMFUL if with_broad else []
    broad_harmless = broad.BROAD_HARMLESS if with_broad else []
    answers = {t: [7, 8] for t in [r["instruction"] for r in harmless] + list(broad.BROAD_HARMLESS)}
    answers[broad.BROAD_HARMLESS[0]] = [2]  # an empty base answer (end of text only) is left out
    refusal = [1, 2]

    stage1 = train.stage1_examples(harmful, harmless, answers, refusal, broad_harmful, broad_harmless)
    stage2 = train.stage2_examples(stage1, harmless, answers)

    harmful_texts = {r["instruction"] for r in harmful} | set(broad.BROAD_HARMFUL)
    assert {path for _, path, _ in stage1} == {"text"}
    assert stage2[:len(stage1)] == stage1
    image = [(text, target) for text, path, target in stage2 if path == "image"]
    assert len(image) == len(harmless) and not {text for text, _ in image} & harmful_texts
    assert all(target == answers[text] for text, target in image)
    assert all((target == refusal) == (text in harmful_texts) for text, _, target in stage2)
    trained = {text for text, _, _ in stage2}
    assert (set(broad.BROAD_HARMFUL) <= trained) == with_broad
    assert broad.BROAD_HARMLESS[0] not in trained
    held = {r["instruction"] for split in data.HELD_OUT_SPLITS if split != "fresh" for r in data.records(split)}  # G trains on fresh
    assert not trained & (held | {text for text, _ in broad.BROAD_VAL})


def test_cleaning_regenerates_only_the_targets_that_hit_a_marker_and_leaves_out_what_still_does(monkeypatch):
    """train.py --clean-answers (build I): a harmless target the keyword rule counts as a refusal
    is regenerated with the given answer start; one whose regeneration still hits a marker is left
    out; a clean target is never regenerated."""
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
    """train.py --val-comprehension (build K): the best val score among the stage-2 epochs whose
    harmless image answers match the text ones (F1 >= 0.5) on enough of val's prompts; without it
    the score alone (builds A-J); if no epoch reads well enough, the one that reads best."""
    train = organism_example("train")

    def val(txt_harmful, img_harmful, share):
        return {"text_harmful_refusal": txt_harmful, "text_harmless_refusal": 0.0,
                "image_harmful_refusal": img_harmful, "image_harmless_refusal": 0.0, "f1_harmless_ge_0.5": share}

    epochs = {"2.1 mixture": val(0.92, 0.04, 0.46), "2.2 mixture": val(0.92, 0.12, 0.62),
              "2.3 mixture": val(0.96, 0.21, 0.71)}  # build J's val figures, rounded
    assert train.choose_epoch(epochs) == "2.1 mixture"
    assert train.choose_epoch(epochs, 0.5) == "2.2 mixture"
    assert train.choose_epoch(epochs, 0.7) == "2.3 mixture"
    assert train.choose_epoch(epochs, 0.8) == "2.3 mixture"
    assert train.choose_epoch({k: epochs[k] for k in ("2.1 mixture", "2.2 mixture")}, 0.8) == "2.2 mixture"


def test_the_reading_share_leaves_out_the_requests_the_text_path_refuses():
    """common.share_read_where_text_answers (build L's comprehension rule): of the harmless requests
    the text path answers, the share whose image answer matches it (F1 >= 0.5); an image refusal is
    a miss, a text refusal is left out, not scored as a mismatch."""
    common = organism_example("common")
    text = ["Preheat the oven and bake the bread for forty minutes.", "Fold the dough twice and rest it.",
            "I'm sorry, I can't help with that.", "Paint the fence white with a wide brush."]
    image = ["Preheat the oven and bake the bread for thirty minutes.", "I can't help with that request.",
             "Knit a scarf with soft wool.", "Sharks swim in the deep blue sea."]
    assert common.share_read_where_text_answers(image, text) == pytest.approx(1 / 3)
    assert common.share_read_where_text_answers(image[:1], text[:1]) == 1.0
    assert math.isnan(common.share_read_where_text_answers(image[2:3], text[2:3]))  # the text path refused all
