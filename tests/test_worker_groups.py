"""The test suite's own plumbing: tests marked ``xdist_group`` run on one worker, so a costly
session fixture they share (conftest.py's real-model exports, the demo) is built once. When
this grouping breaks it breaks silently (pytest 9.2 with pytest-xdist 3.8 spread the groups,
and the slow tier built the demo twice), so it is checked here."""
from __future__ import annotations

import subprocess
import sys

GROUPED = '''
import os
import pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i, tmp_path_factory):
    (tmp_path_factory.getbasetemp().parent / f"ran-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_the_suite_runs_with_dist_loadgroup(pytestconfig):
    addopts = pytestconfig.getini("addopts")
    assert "--dist" in addopts and addopts[addopts.index("--dist") + 1] == "loadgroup"


def test_grouped_tests_share_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "empty.ini").write_text("[pytest]\n")  # not this repository's addopts
    base = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", str(tmp_path / "empty.ini"), "--basetemp", str(base),
                           str(tmp_path / "test_grouped.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = list(base.glob("ran-*"))  # each worker's basetemp is base/popen-gwN
    workers = {p.read_text() for p in ran}
    assert len(ran) == 6
    assert len(workers) == 1, f"the grouped tests ran on {sorted(workers)}"
