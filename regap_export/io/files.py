"""Opening a file the user named: regular files only, bounded reads, strict JSON.

Every reader of a user's file (a data file, an image, a markers file, a folder's JSON) checks
the path with ``os.stat`` before it opens it: a FIFO, a device or a socket would block the
open or the read forever (or read without end), so anything but a regular file is refused
with one line. Reads are bounded, so a file that grows while it is read cannot exhaust memory.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ..errors import RegapError

# A JSON file of a folder (config, manifest, processor settings, a report): far above any real one.
MAX_JSON_BYTES = 64 << 20


def check_regular_file(path: str | Path, *, what: str = "file", error: type[RegapError] = RegapError,
                       field: str | None = None, hint: str = "check the path", missing: str | None = None) -> int:
    """Refuse ``path`` unless it is a regular file (links followed); returns its size. ``missing``
    words the error for a path that does not exist (default: "``what`` not found")."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(missing or f"{what} not found", path=path, field=field, hint=hint) from None
    except NotADirectoryError:
        raise error(f"{what} not found (a parent is not a folder)", path=path, field=field, hint=hint) from None
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or exc})", path=path, field=field) from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"is a folder, not a {what}", path=path, field=field, hint=hint)
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        raise error(f"{what} is {kind}; only regular files are read", path=path, field=field,
                    hint="pass a regular file")
    return info.st_size


def read_regular_bytes(path: str | Path, *, limit: int, what: str = "file", error: type[RegapError] = RegapError,
                       field: str | None = None, hint: str = "check the path", missing: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before and while reading)."""
    size = check_regular_file(path, what=what, error=error, field=field, hint=hint, missing=missing)
    too_big = error(f"{what} is larger than {_size(limit)}", path=path, field=field,
                    hint="pass a smaller file")
    if size > limit:
        raise too_big
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or exc})", path=path, field=field) from None
    if len(data) > limit:
        raise too_big
    return data


def read_strict_json(path: str | Path, *, what: str, error: type[RegapError], hint: str,
                     limit: int = MAX_JSON_BYTES, missing: str | None = None) -> Any:
    """A UTF-8 JSON file parsed strictly (``checks.strict_json_loads``: no NaN or Infinity, no
    duplicate key); a syntax error names its line."""
    from .checks import strict_json_loads

    raw = read_regular_bytes(path, limit=limit, what=what, error=error, hint=hint, missing=missing)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise error(f"{what} is not UTF-8 text", path=path, line=line, hint=hint) from None
    return strict_json_loads(text, path=path, what=what, error=error, hint=hint)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n:,d} bytes"
