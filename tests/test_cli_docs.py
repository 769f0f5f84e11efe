"""docs/CLI.md names every option of every command, and only options that exist.

Each command's ``--help`` is read from the installed console script (``regap-export`` next to the
interpreter running the tests; ``python -m regap_export.cli`` where there is none), as a user
would see it; its options are compared with the first cells of that command's option table in
docs/CLI.md (a section ``## <command>``). A new option or command without its row fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CLI_DOC = ROOT / "docs" / "CLI.md"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "regap-export"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "regap_export.cli"]


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(_cli() + [*command, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _panel_lines(text: str, title: str) -> list[str]:
    """The lines of the rich help panel whose top border names ``title`` (Options, Commands)."""
    lines, inside = [], False
    for line in text.splitlines():
        if re.match(rf"^\W*{title}\b", line.strip("╭─ ")) and line.lstrip().startswith("╭"):
            inside = True
            continue
        if inside and line.lstrip().startswith("╰"):
            break
        if inside:  # the border and its one space of padding; a continuation row stays indented
            lines.append(line.strip().strip("│").rstrip()[1:])
    return lines


def commands() -> list[str]:
    names = [line.split()[0] for line in _panel_lines(_help(), "Commands") if line and not line.startswith(" ")]
    assert names, "regap-export --help lists no commands"
    return names


def help_options(command: str) -> set[str]:
    """The options ``command --help`` lists: the names before each row's type (``<str>``)."""
    found = set()
    for line in _panel_lines(_help(command), "Options"):
        head = line.split("<", 1)[0] if "<" in line else ""
        found |= set(OPTION.findall(head))
    found.discard("--help")
    assert found or command in ("compare", "inspect", "validate"), f"{command} --help lists no options"
    return found


def _doc_sections() -> dict[str, str]:
    sections, name = {}, None
    for line in CLI_DOC.read_text().splitlines():
        heading = re.match(r"^## (\S+)\s*$", line)
        if heading:
            name = heading.group(1)
            sections[name] = ""
        elif name:
            sections[name] += line + "\n"
    return sections


def doc_options(command: str) -> set[str]:
    """The options in the first cells of the option table of ``## command`` in docs/CLI.md."""
    section = _doc_sections().get(command)
    assert section is not None, f"docs/CLI.md has no section '## {command}'"
    found = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = re.split(r"(?<!\\)\|", line.strip().strip("|"))[0]
            found |= set(OPTION.findall(first))
    return found


def test_the_help_parser_reads_options_and_commands():
    """The parser itself: calibrate's help holds options the docs cannot lose track of."""
    options = help_options("calibrate")
    assert {"--data", "--out", "--alpha0", "--render", "--no-render", "--merge-stats"} <= options
    assert {"calibrate", "export", "validate", "evaluate", "generate", "demo"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_every_option_of_a_command_is_in_cli_md_and_every_documented_option_exists(command):
    in_help, in_doc = help_options(command), doc_options(command)
    assert not in_help - in_doc, f"{command}: options missing from docs/CLI.md: {sorted(in_help - in_doc)}"
    assert not in_doc - in_help, f"{command}: docs/CLI.md lists options --help does not: {sorted(in_doc - in_help)}"


def test_cli_md_documents_no_command_that_does_not_exist():
    documented = {name for name, text in _doc_sections().items() if re.search(r"^\| option", text, re.M)}
    assert documented <= set(commands()), documented - set(commands())
