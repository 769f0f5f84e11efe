"""Write an output folder completely or not at all: build it in a temporary sibling, then rename.

What an output folder may cost (the README's "What we guarantee"):

- ``--force`` replaces only a folder this tool wrote (an export's ``regap_manifest.json``
  lists its files; a calibration holds ``directions.safetensors`` and its known companions)
  and holds nothing else; it never replaces a folder that is or holds a path the command
  reads (``--data``, ``--directions``, the model folder, ``--merge-stats``).
- One writer at a time: ``.<name>.lock`` beside the output is locked while the folder is
  written and renamed; a second writer is refused, and a writer that finds the output
  created meanwhile (without ``--force``) is refused instead of replacing it.
- Temporary ``.<name>.partial-<pid>-<hex>`` folders of killed runs are removed by the next
  run that writes the same output.
- File-system failures (read-only, not a directory, no space, permission) are one-line
  ``RegapError``s; the temporary folder is removed.
- A file written into a folder the tool may not own (validate's and evaluate's reports, the
  manifest's parity record) goes through ``atomic_file`` / ``write_file_atomic``: a new
  temporary sibling created exclusively and without following links, renamed over the name.
  A symbolic link planted at the name is replaced, never written through.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from ..errors import RegapError

# Files a calibration folder may hold (directions_io.FILENAME, report.REPORT_FILENAME,
# report.PLOT_FILENAME, api.STATS_FILENAME), or a tune folder (tune.TUNE_FILENAME, tune.PLOT_FILENAME);
# an export lists its files in its manifest.
CALIBRATION_FILES = ("directions.safetensors", "report.json", "separability.png", "stats.safetensors",
                     "tune.json", "frontier.png")
MANIFEST_FILE = "regap_manifest.json"
# written into an export after it: validate's report, evaluate's report and plot, and their temporaries
EXPORT_EXTRA_FILES = (MANIFEST_FILE, "parity.json", "evaluation.json", "evaluation.png")
# atomic_file's temporaries of those (``.<name>.tmp-<pid>-<hex>``), and the older fixed names
EXPORT_EXTRA_TEMPORARIES = (*(f".{name}.tmp-" for name in EXPORT_EXTRA_FILES), "regap_manifest.json.tmp")
FS_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ENOTDIR: "a parent is not a directory",
             errno.EEXIST: "a file is in the way (is a parent not a directory?)", errno.EISDIR: "is a directory",
             errno.ENAMETOOLONG: "file name too long"}


def filesystem_error(exc: OSError, path: Path | str | None = None) -> RegapError | None:
    """A one-line RegapError for an OSError the user's file system caused, else None."""
    if exc.errno not in FS_ERRNOS:
        return None
    where = path if path is not None else (exc.filename or None)
    return RegapError(f"cannot write: {FS_ERRNOS[exc.errno]} ({exc.strerror or exc})", path=where,
                      hint="choose another --out or free the space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                      else "choose another --out")


# Writers that are not Python's own (safetensors' Rust code, protobuf) report the OS error
# in their message only.
_MESSAGE_ERRNOS = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                   ("Read-only file system", errno.EROFS), ("os error 30", errno.EROFS),
                   ("Disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT))


def filesystem_error_in(exc: BaseException) -> RegapError | None:
    """``filesystem_error`` for an OSError, or for another exception whose message carries
    a file-system errno (no space, read-only, quota); else None."""
    if isinstance(exc, OSError):
        return filesystem_error(exc)
    text = str(exc)
    for fragment, code in _MESSAGE_ERRNOS:
        if fragment in text:
            return filesystem_error(OSError(code, os.strerror(code)))
    return None


# Below this many free bytes an errno-less write failure is taken for a full disk.
NEARLY_FULL_BYTES = 16 << 20


def full_disk_error(exc: BaseException, where: Path) -> RegapError | None:
    """The no-space RegapError for a write failure that carries no errno (numpy's ``tofile``,
    which onnx_ir's external-data writer uses, says only "problem writing element N to
    file") when the disk under ``where`` is in fact (nearly) full; else None."""
    if not isinstance(exc, OSError) or exc.errno is not None:
        return None
    try:
        free = shutil.disk_usage(_nearest_existing(Path(where))).free
    except OSError:
        return None
    if free >= NEARLY_FULL_BYTES:
        return None
    return filesystem_error(OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {exc}"), where)


def check_free_space(out: Path, needed_bytes: int, what: str, *, hint: str) -> None:
    """Refuse before writing when the file system that will hold ``out`` has less than
    ``needed_bytes`` free: a full disk found at the end of a long export wastes the run."""
    anchor = _nearest_existing(Path(out).parent)
    try:
        free = shutil.disk_usage(anchor).free
    except OSError:
        return
    if free < needed_bytes:
        raise RegapError(f"not enough free space: {what} needs at least {_size(needed_bytes)}, "
                         f"{_size(free)} free", path=anchor, hint=hint)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def check_writable_location(out: Path) -> None:
    """The folder ``out`` would be created in exists (or can be) and is writable."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    anchor = _nearest_existing(parent)
    if not anchor.is_dir():
        raise RegapError("cannot create the output: a parent is not a directory", path=anchor,
                         hint="choose another --out")
    if not os.access(anchor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(anchor) else "permission denied"
        raise RegapError(f"cannot create the output: {reason}", path=anchor, hint="choose another --out")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_replaceable(out: Path, inputs: Iterable[Path | str | None] = ()) -> None:
    """What ``--force`` may replace: a folder this tool wrote, holding nothing else, that is
    not and does not hold any of ``inputs``. Refusals name what would be lost."""
    out = Path(out)
    real_out = out.resolve()
    for item in inputs:
        if item is None or not os.path.lexists(str(item)):
            continue
        real_in = Path(item).resolve()
        if _is_within(real_in, real_out):
            raise RegapError(f"--force would delete {item}, which this command reads", path=out,
                             hint="write to another --out")
    if not out.is_dir():
        return
    present = sorted(p for p in out.rglob("*") if not p.is_dir() and "__pycache__" not in p.parts)
    if not present:
        return
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        try:
            allowed = set(json.loads(manifest.read_text())["files"]) | set(EXPORT_EXTRA_FILES)
        except (ValueError, KeyError, TypeError, OSError):
            raise RegapError("--force refuses: the manifest is unreadable, so this may not be a folder "
                             "regap-export wrote", path=manifest, hint="remove it yourself or choose another --out") from None
    elif (out / CALIBRATION_FILES[0]).is_file():
        allowed = set(CALIBRATION_FILES)
    else:
        raise RegapError(f"--force refuses to replace a folder regap-export did not write; it would delete "
                         f"{present[0]}", path=out, hint="remove it yourself or choose another --out")
    for path in present:
        rel = path.relative_to(out).as_posix()
        if manifest.is_file() and rel.startswith(EXPORT_EXTRA_TEMPORARIES):
            continue
        if rel not in allowed:
            raise RegapError(f"--force refuses: {path} was not written by regap-export and would be deleted",
                             path=out, hint="move it away or choose another --out")


def check_output_dir(out: Path, *, force: bool, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse an output before any work is done (so a refusal costs nothing): existing without
    --force, not ours, one of the inputs, unwritable, or being written by another process."""
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise RegapError("output directory exists", path=out, hint="pass --force to replace it")
    if os.path.lexists(out) and not out.is_dir():
        raise RegapError("output path exists and is not a directory", path=out)
    if os.path.lexists(out):
        check_replaceable(out, inputs)
    check_writable_location(out)
    if out.parent.is_dir():
        with _output_lock(out):
            pass


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


# The lock file is opened, never written: O_NOFOLLOW refuses a planted symbolic link, O_NONBLOCK
# keeps a planted FIFO from blocking the open, and the fstat check refuses anything but a
# regular file. (Not O_EXCL: a lock file left by a killed run must be reusable; flock, not the
# file's existence, is the lock.)
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _open_lock_file(path: Path, out: Path) -> int:
    try:
        fd = os.open(path, _LOCK_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RegapError("the lock file is a symbolic link; it is not followed", path=path,
                             hint="remove the link, or choose another --out") from None
        user_error = filesystem_error(exc, out.parent)
        raise (user_error or RegapError(f"cannot create the lock file ({exc.strerror or exc})", path=path,
                                        hint="choose another --out")) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RegapError("the lock file is not a regular file", path=path, hint="remove it, or choose another --out")
    return fd


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``.<name>.lock`` beside ``out``; removed on release."""
    path = _lock_path(out)
    while True:
        fd = _open_lock_file(path, out)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RegapError("another regap-export process is writing this output now", path=out,
                             hint=f"wait for it to finish, or choose another --out (lock file {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: retry
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove temporary folders of earlier, killed runs for ``out``. Call with the lock held:
    a live writer holds it, so every partial found then is stale (a live pid is kept anyway)."""
    removed = []
    for pattern in (f".{glob.escape(out.name)}.partial-*", f".{glob.escape(out.name)}.old-*"):
        for path in out.parent.glob(pattern):
            pid_text = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 2 else ""
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue
            _remove(path)
            removed.append(path)
    if removed:
        print(f"regap-export: removed {len(removed)} unfinished folder(s) of earlier interrupted runs: "
              + ", ".join(str(p) for p in removed), file=sys.stderr)
    return removed


def normalize_permissions(folder: Path) -> None:
    """Every file 0666 & ~umask, every folder 0777 & ~umask (some writers create files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = 0o777 if path.is_dir() else 0o666
        if stat.S_IMODE(path.stat().st_mode) != mode & ~mask:
            path.chmod(mode & ~mask)


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    out = Path(out)
    inputs = list(inputs)
    existed = os.path.lexists(out)
    check_output_dir(out, force=force, inputs=inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (filesystem_error(exc, out.parent) or exc) from None
    with _output_lock(out):
        remove_stale_partials(out)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            yield tmp
            normalize_permissions(tmp)
            # Re-check under the lock: another run may have written ``out`` since our first check.
            if os.path.lexists(out):
                if not force or not existed:
                    raise RegapError("another run created this output while this one was working; "
                                     "it was not replaced", path=out, hint="pass --force to replace it")
                check_replaceable(out, inputs)
        except OSError as exc:
            # Judged before the partial folder is removed: removing it frees the space.
            user_error = filesystem_error(exc) or full_disk_error(exc, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise (user_error or exc) from None
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            user_error = None if isinstance(exc, RegapError) else filesystem_error_in(exc)
            if user_error is None:
                raise
            raise user_error from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        try:
            if os.path.lexists(out):
                old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
            os.replace(tmp, out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not os.path.lexists(out):
                os.replace(old, out)
                old = None
            raise (filesystem_error(exc, out) or exc) from None
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    """Remove a folder this tool replaced or left behind; a symbolic link (``--out`` given as a
    link to a folder) is removed itself, its target left as it is."""
    if os.path.islink(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- single files in a folder this tool may not own -------------------------------------------
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _create_temporary_sibling(path: Path) -> tuple[int, Path]:
    """A new, empty file beside ``path`` that this call created (O_CREAT | O_EXCL | O_NOFOLLOW:
    nothing already there, link or file, is ever opened)."""
    for _ in range(32):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise (filesystem_error(exc, path.parent)
                   or RegapError(f"cannot write here ({exc.strerror or exc})", path=path)) from None
    raise RegapError("cannot create a temporary file: every name tried exists", path=path.parent)


@contextlib.contextmanager
def atomic_file(path: Path | str, *, binary: bool = False) -> Iterator[IO]:
    """Write ``path`` completely or not at all, and never through a link: yields a file object on
    a temporary sibling this call created, then renames it over ``path``. A symbolic link at
    ``path`` is replaced by the new file (its target is not touched); a folder there is refused.
    On any failure the temporary file is removed and ``path`` keeps its old content."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise RegapError("a folder is in the way of this file", path=path, hint="move it away")
    fd, tmp = _create_temporary_sibling(path)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, RegapError):
            user_error = filesystem_error(exc, path)
            if user_error is not None:
                raise user_error from None
        raise


def write_file_atomic(path: Path | str, content: str | bytes) -> Path:
    """``atomic_file`` for content already in memory (text is written as UTF-8)."""
    with atomic_file(path, binary=isinstance(content, bytes)) as f:
        f.write(content)
    return Path(path)


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Strict JSON (no NaN or Infinity: ``allow_nan=False``), sorted keys, two-space indent."""
    return write_file_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
