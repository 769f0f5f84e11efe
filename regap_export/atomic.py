"""Write an output folder completely or not at all: build it in a temporary sibling, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import RegapError


def check_output_dir(out: Path, *, force: bool) -> None:
    """Refuse an existing output before any work is done (so a refusal costs nothing)."""
    if out.exists() and not force:
        raise RegapError("output directory exists", path=out, hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise RegapError("output path exists and is not a directory", path=out)


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool) -> Iterator[Path]:
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
