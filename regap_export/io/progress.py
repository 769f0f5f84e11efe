"""Progress bars on stderr (rich), silent when disabled or when stderr is not a terminal."""
from __future__ import annotations

import sys
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


