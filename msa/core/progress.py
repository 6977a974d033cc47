"""Progress bars for long work: items/s and time left, on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
errors = Console(stderr=True)  # never quieted: `msa --quiet` still says why it failed


def progress_bar(enabled: bool = True, transient: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        # msa --quiet: no bars anywhere; a transient bar is nothing to keep in a log file
        disable=not enabled or console.quiet or (transient and not console.is_terminal),
        transient=transient,
    )


def rate_text(done: int, seconds: float, unit: str = "items") -> str:
    return f"{done / seconds:.1f} {unit}/s" if seconds > 0 else ""


class ItemProgress:
    """One progress bar with an items/s rate, as a context that yields advance(n)."""

    def __init__(self, label: str, total: int, enabled: bool, transient: bool = False):
        self.bar = progress_bar(enabled, transient)
        self.task = self.bar.add_task(f"{label:>5}", total=total, rate="")
        self.start = time.perf_counter()
        self.done = 0

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return self.advance

    def advance(self, n: int) -> None:
        self.done += n
        self.bar.update(self.task, advance=n, rate=rate_text(self.done, time.perf_counter() - self.start))

    def __exit__(self, *exc) -> None:
        self.bar.stop()
