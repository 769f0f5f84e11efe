"""`compare`: two evaluations of the same records, paired, from evaluation.json files only."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from regap_export.evaluation.behaviour import Generation, summarize
from regap_export.evaluation.comparison import compare_evaluations, format_comparison, read_evaluation
from regap_export.errors import ArtifactError, RegapError
from regap_export.evaluation.proportions import mcnemar_exact_p, wilson_interval
from regap_export.cli import app

REFUSE, COMPLY = "I can't help with that request.", "Sure, here is how."


def evaluation(corrected: dict[str, bool], uncorrected: str = COMPLY, **settings) -> dict:
    """An evaluation.json-shaped report: image harmful records h0.. and harmless b0.., refused
    with the correction on where ``corrected`` says so; text records refuse harmful, answer harmless."""
    gens = []
    for rid, refused in corrected.items():
        label = "harmful" if rid.startswith("h") else "harmless"
        gens.append(Generation(rid, "image", label, uncorrected, REFUSE if refused else COMPLY, [1], [2], 0.0, 0.0))
        text = REFUSE if label == "harmful" else COMPLY
        gens.append(Generation(rid + "-text", "text", label, text, text, [3], [3], 0.0, 0.0))
    report = {"format_version": "1", "max_new_tokens": 32, "behaviour": summarize(gens),
              "generations": [g.__dict__ for g in gens]}
    report.update(settings)
    return report


# A refuses h0-h2 and b0; B refuses h0-h9 and b0-b1: on harmful images 7 records differ, all
# refused by B only; on harmless ones 1 (b1, B only).
A = evaluation({**{f"h{i}": i < 3 for i in range(12)}, **{f"b{i}": i == 0 for i in range(12)}})
B = evaluation({**{f"h{i}": i < 10 for i in range(12)}, **{f"b{i}": i < 2 for i in range(12)}})


def test_cells_by_hand():
    result = compare_evaluations(A, B)
    assert result["n"] == 48 and result["uncorrected_replies_differ"] == 0
    cells = {(c["modality"], c["label"]): c for c in result["cells"]}
    assert list(cells) == [("text", "harmful"), ("text", "harmless"), ("image", "harmful"), ("image", "harmless")]
    harmful = cells["image", "harmful"]
    assert harmful["n"] == 12 and harmful["refusal_a"] == 3 / 12 and harmful["refusal_b"] == 10 / 12
    assert (harmful["refused_only_a"], harmful["refused_only_b"]) == (0, 7)
    assert harmful["mcnemar_p"] == 2 / 2 ** 7
    assert harmful["refusal_b_ci95"] == list(wilson_interval(10, 12))
    harmless = cells["image", "harmless"]
    assert (harmless["refused_only_a"], harmless["refused_only_b"], harmless["mcnemar_p"]) == (0, 1, 1.0)
    text = cells["text", "harmful"]
    assert text["refusal_a"] == text["refusal_b"] == 1.0 and text["mcnemar_p"] == 1.0
    swapped = {(c["modality"], c["label"]): c for c in compare_evaluations(B, A)["cells"]}
    assert swapped["image", "harmful"]["refused_only_a"] == 7
    assert swapped["image", "harmful"]["mcnemar_p"] == mcnemar_exact_p(7, 0)


def test_table_and_a_warning_when_the_uncorrected_replies_differ():
    table = format_comparison(compare_evaluations(A, B, names=("first", "second")))
    lines = table.splitlines()
    assert "A = first" in lines[0] and "B = second" in lines[1]
    assert len({len(line) for line in lines[2:]}) == 1                  # fixed width
    image_harmful = next(line for line in lines if line.startswith("image     harmful"))
    assert " 25.0% [" in image_harmful and " 83.3% [" in image_harmful and image_harmful.split()[-4:] == ["0", "/", "7", "0.016"]
    assert "warning" not in table
    other_model = evaluation({**{f"h{i}": False for i in range(12)}, **{f"b{i}": False for i in range(12)}},
                             uncorrected="Another model's reply.")
    result = compare_evaluations(A, other_model)
    assert result["uncorrected_replies_differ"] == 24
    assert "warning: the uncorrected replies differ on 24 of 48 records" in format_comparison(result)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["generations"].pop(), "did not run the same records: 1 only in A, 0 only in B"),
    (lambda r: r.update(max_new_tokens=16), "differ in max_new_tokens"),
    (lambda r: r["behaviour"].update(markers=["nope"]), "differ in markers"),
    (lambda r: r["generations"][0].update(label="harmless"), "is labelled harmful in A and harmless in B"),
])
def test_evaluations_that_are_not_paired_are_refused(change, message):
    other = json.loads(json.dumps(A))
    change(other)
    with pytest.raises(RegapError, match=message):
        compare_evaluations(A, other)


def test_duplicate_records_are_refused():
    doubled = json.loads(json.dumps(A))
    doubled["generations"].append(doubled["generations"][0])
    with pytest.raises(ArtifactError, match="appears twice in evaluation B"):
        compare_evaluations(A, doubled)


def test_read_evaluation_from_a_folder_or_a_file_and_its_errors(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "evaluation.json").write_text(json.dumps(A))
    assert read_evaluation(folder) == read_evaluation(folder / "evaluation.json") == json.loads(json.dumps(A))
    with pytest.raises(ArtifactError, match="no evaluation.json here.*evaluate FOLDER"):
        read_evaluation(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": "1",\n "generations": [,]}')
    with pytest.raises(ArtifactError, match=r"bad.json:2: evaluation.json is not valid JSON"):
        read_evaluation(bad)
    bad.write_text(json.dumps({"format_version": "1"}))
    with pytest.raises(ArtifactError, match="not an evaluation report"):
        read_evaluation(bad)
    bad.write_text(json.dumps({**A, "format_version": "2"}))
    with pytest.raises(ArtifactError, match="format_version '2' is not supported"):
        read_evaluation(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ArtifactError, match="not UTF-8"):
        read_evaluation(bad)


def test_cli_table_json_and_one_line_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "a.json").write_text(json.dumps(A))
    (tmp_path / "b.json").write_text(json.dumps(B))
    result = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "refused only by A / B" in result.output and "0 / 7" in result.output
    header = next(line for line in result.output.splitlines() if "refused only by A / B" in line)
    assert len(header) > 80 and header.rstrip().endswith("McNemar p"), "a table row wrapped at 80 columns"
    result = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(compare_evaluations(
        A, B, names=(str(tmp_path / "a.json"), str(tmp_path / "b.json")))))
    result = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "missing")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no evaluation.json here" in result.output


def test_compare_needs_no_torch_or_transformers(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a.json").write_text(json.dumps(A))
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import regap_export as rx\n"
            f"a = rx.read_evaluation({str(tmp_path / 'a.json')!r})\n"
            "print(rx.compare_evaluations(a, a)['n'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "48"
