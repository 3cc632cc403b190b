"""Progress of long work (decoding thousands of images, keypoints): a rich bar with the count,
the rate and the time left, on a terminal and in Jupyter alike; shared by the CLI and the
Python API."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["RateColumn", "progress_bar"]


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(
    description: str, *, enabled: bool = True, console: Console | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """Yields a `(done, total)` callback driving a bar (count, rate, time left) on `console`
    (stderr by default), or None when not `enabled`. Transient: a finished bar leaves no line
    (callers print their own summary); off a terminal rich draws nothing live."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update
