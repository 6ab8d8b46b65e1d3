"""The `check` progress line: a rich status on stderr, drawn only once a run takes a while.

CLI layer (the library reports through the `CheckEvent` observer and never imports rich). A
timer starts the display after `DELAY_S`, so a run that finishes sooner prints nothing; the
display is transient and leaves nothing behind on the terminal.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_doctor.checks.context import CheckEvent

#: Seconds a run must last before the progress line appears.
DELAY_S = 1.0


class CheckProgress:
    """Observer of `CheckEvent`s that draws them as a transient progress line on stderr."""

    def __init__(self, delay: float | None = None, console: Any = None) -> None:
        self._lock = threading.Lock()
        self._console = console
        self._progress: Any = None
        self._task: Any = None
        self._closed = False
        self._fields: dict[str, Any] = {"description": "checking", "total": None, "completed": 0}
        self._timer = threading.Timer(DELAY_S if delay is None else delay, self._start)
        self._timer.daemon = True

    def __enter__(self) -> CheckProgress:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._progress is not None:
                self._progress.stop()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        with self._lock:
            if self._closed:
                return
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TimeElapsedColumn(), console=self._console or Console(stderr=True),
                transient=True)
            self._progress.start()
            self._task = self._progress.add_task(**self._fields)

    def __call__(self, ev: CheckEvent) -> None:
        name = Path(ev.target).name or str(ev.target)
        if ev.phase == "read" and ev.file is not None:
            fields = {"description": f"{name}: reading {Path(ev.file).name}",
                      "total": ev.bytes_total or None, "completed": ev.bytes_done}
        elif ev.phase == "check":
            fields = {"description": f"{name}: {ev.code}", "total": None, "completed": 0}
        else:
            fields = {"description": f"{name}: starting", "total": None, "completed": 0}
        with self._lock:
            bar_gone = self._fields["total"] is not None and fields["total"] is None
            self._fields = fields
            if self._progress is None or self._closed:
                return
            if bar_gone:  # rich cannot set a task's total back to "unknown": start a new one
                self._progress.remove_task(self._task)
                self._task = self._progress.add_task(**fields)
            else:
                self._progress.update(self._task, **fields)
