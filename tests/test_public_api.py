"""The public API is the package's top level: every name resolves, stays what it is after every
submodule is imported, and the README's example uses only top-level names."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import regap_export as rx

NAMES = [name for name in rx.__all__ if name != "__version__"]


def test_every_top_level_name_resolves_and_survives_submodule_imports():
    first = {name: getattr(rx, name) for name in NAMES}
    assert all(callable(obj) for obj in first.values())
    for module in pkgutil.walk_packages(rx.__path__, "regap_export."):
        importlib.import_module(module.name)
    # a submodule named like a top-level function would have replaced it on the package
    assert {name: getattr(rx, name) for name in NAMES} == first


def test_one_name_per_cli_command():
    from typer.main import get_command

    from regap_export.cli import app

    commands = set(get_command(app).commands)
    by_command = {"calibrate": "calibrate_to_folder", "export": "export_to_folder", "validate": "validate_folder",
                  "evaluate": "evaluate_folder", "compare": "compare_evaluations", "generate": "generate",
                  "inspect": "describe", "demo": "demo", "tune": "tune_to_folder"}
    assert commands == set(by_command)
    assert set(by_command.values()) <= set(NAMES)


def test_readme_python_example_uses_the_top_level_api():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    used = set(re.findall(r"\brx\.(\w+)", readme))
    assert used, "the README shows no use of the Python API"
    assert used <= set(NAMES), used - set(NAMES)
