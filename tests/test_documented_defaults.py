"""The defaults users read are the defaults the code runs: docs/CLI.md's calibrate option table,
docs/METHOD.md's "Defaults" line and `calibrate --help` all state what `RegapOptions()` holds
(alpha 0.75 was chosen by measurement on the organism; a change to it, or to a band, must move
the docs with it)."""
from __future__ import annotations

import re
from pathlib import Path

from regap_export.options import RegapOptions

ROOT = Path(__file__).parents[1]
DEFAULTS = RegapOptions()


def _cli_doc_option_row(option: str) -> list[str]:
    """The cells of the row of docs/CLI.md's calibrate option table whose first cell names ``option``."""
    text = (ROOT / "docs" / "CLI.md").read_text()
    section = text.split("\n## calibrate\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        # An escaped pipe (`a\\|b`) is part of a cell, not a column break.
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and option in cells[0]:
            return cells
    raise AssertionError(f"docs/CLI.md's calibrate section has no option-table row for {option}")


def _band_formula(band_text: str, num_layers: int) -> tuple[int, int]:
    """'L/4:L/2' or '3L/4' evaluated for a depth (floor division, as RegapOptions.resolved)."""
    def value(term: str) -> int:
        match = re.fullmatch(r"(\d*)L/(\d+)", term.strip())
        assert match, f"not a band formula: {band_text!r}"
        return (int(match.group(1) or 1) * num_layers) // int(match.group(2))
    start, end = band_text.strip("`").split(":")
    return value(start), value(end)


def test_cli_doc_strengths_and_threshold_are_the_code_defaults():
    row = _cli_doc_option_row("`--alpha0`")
    stated = [float(x) for x in row[1].split(",")]
    assert stated == [DEFAULTS.alpha0, DEFAULTS.alpha_max, DEFAULTS.tau]


def test_cli_doc_bands_and_choices_are_the_code_defaults():
    for depth in (24, 30, 32):
        resolved = DEFAULTS.resolved(depth)
        probe = _band_formula(_cli_doc_option_row("`--probe-band")[1], depth)
        adaptive = _band_formula(_cli_doc_option_row("`--adaptive-band")[1], depth)
        assert probe == (resolved.probe_band.start, resolved.probe_band.end)
        assert adaptive == (resolved.adaptive_band.start, resolved.adaptive_band.end)
    for option, value in (("`--read-position", DEFAULTS.read_position), ("`--drift-component", DEFAULTS.drift_component),
                          ("`--mode", DEFAULTS.mode), ("`--positions", DEFAULTS.positions),
                          ("`--layer-drift", DEFAULTS.layer_drift)):
        assert _cli_doc_option_row(option)[1] == f"`{value}`", option


def test_method_doc_defaults_line_is_the_code_defaults():
    method = (ROOT / "docs" / "METHOD.md").read_text()
    match = re.search(r"`alpha0 = alpha_max = ([\d.]+)`, `tau = ([\d.]+)`", method)
    assert match, "docs/METHOD.md states no alpha0/alpha_max/tau defaults"
    assert float(match.group(1)) == DEFAULTS.alpha0 == DEFAULTS.alpha_max
    assert float(match.group(2)) == DEFAULTS.tau


def test_calibrate_help_shows_the_code_defaults():
    from typer.testing import CliRunner

    from regap_export.cli import app

    result = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for option, value in (("--alpha0", DEFAULTS.alpha0), ("--alpha-max", DEFAULTS.alpha_max), ("--tau", DEFAULTS.tau)):
        match = re.search(re.escape(option) + r"\b.*?\[default: ([\d.]+)\]", flat)
        assert match and float(match.group(1)) == value, option
