"""Progress bars for the slow steps of big models (load, fold, save), on stderr.

Small models finish before a bar would be readable, so bars appear only above
``THRESHOLD_BYTES``, never with ``--quiet``, and only on a terminal: a redirected stderr
(a CI log, a file) gets no bar and no residue of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

THRESHOLD_BYTES = 64 * 2**20


class Steps:
    """One bar per step; ``step`` yields a function that advances it (tensors written).

    ``console`` makes the rich Console to draw on, called only when bars are enabled, so
    a quiet or small run never imports rich; a console that is not a terminal gets none.
    """

    def __init__(self, enabled: bool, console: Callable):
        self.enabled = enabled
        self.console = console

    @contextmanager
    def step(self, description: str) -> Iterator[Callable[[int], None] | None]:
        if not self.enabled or not self.console().is_terminal:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console(), transient=False) as progress:
            task = progress.add_task(description, total=None)

            def advance(total: int) -> None:
                progress.update(task, total=total, advance=1)

            yield advance
            task_state = progress.tasks[0]
            progress.update(task, total=task_state.total or 1, completed=task_state.total or 1)


def save_callback(advance: Callable[[int], None] | None):
    """A save_model callback advancing a bar by one tensor per call."""
    if advance is None:
        return None
    return lambda tensor, written, total: advance(total)
