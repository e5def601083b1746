"""Progress of long row-by-row work on stderr: a rich bar on a terminal, else a line per tenth.

`RowProgress` is the `(done, total)` callback `models.score` reports to; it is called from
whatever thread does the work (Spark's progress comes from a polling thread).
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Any

from models.pipeline import Say


class RowProgress:
    def __init__(self, say: Say, description: str = "scoring", interactive: bool | None = None) -> None:
        self.say, self.description = say, description
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        self._next_tenth = 1
        self._interactive = sys.stderr.isatty() if interactive is None else interactive

    def __enter__(self) -> RowProgress:
        return self

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            if self._interactive:
                self._draw(done, total)
            elif total and done * 10 >= total * self._next_tenth:  # logs, pipes: a line per tenth
                self.say(f"  {self.description}: {done:,}/{total:,} rows ({done / total:.0%})")
                self._next_tenth = done * 10 // total + 1

    def _draw(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
