"""Progress bars on stderr (rich), silent when disabled or when stderr is not a terminal."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def progress_bar(batches: Sequence[T], *, description: str, total_items: int | None = None,
                 enabled: bool = True) -> Iterator[T]:
    """Yield batches while advancing a bar by items (batch lengths) when possible."""
    if not enabled:
        yield from batches
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        total = total_items if total_items is not None else len(batches)
        task = bar.add_task(description, total=total)
        for batch in batches:
            yield batch
            bar.advance(task, len(batch) if total_items is not None and hasattr(batch, "__len__") else 1)


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Silence the named loggers below ERROR and every warning, for tools that report routine
    work (each node converted, each op traced) that a user of ours cannot act on."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
