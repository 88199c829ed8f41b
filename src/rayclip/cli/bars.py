"""Progress as people see it: a stage's (done, total) callback drawn as a rich bar on a terminal;
elsewhere (a pipe, a job log) one line when it starts and one when it ends."""

from __future__ import annotations

import threading
import time
from typing import TextIO


class Bar:
    """One stage's progress; a stage that closes it short (a failure) gets its end line too."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream, self.started, self.done, self.total = label, stream, time.monotonic(), -1, -1
        self.finished, self.lock, self.bar = False, threading.RLock(), None
        if stream.isatty():
            from rich import progress as rp
            from rich.console import Console

            columns = [rp.TextColumn("{task.description:<18}"), rp.BarColumn(), rp.MofNCompleteColumn()]
            columns += [rp.TextColumn("{task.fields[rate]}"), rp.TimeElapsedColumn(), rp.TextColumn("eta")]
            columns += [rp.TimeRemainingColumn()]  # the libraries' own prints stay in the run's log, not above the bar
            self.bar = rp.Progress(*columns, console=Console(file=stream), redirect_stdout=False, redirect_stderr=False)
            self.task = self.bar.add_task(label, total=None, rate="")

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if self.total < 0:
                self.started = time.monotonic()
                if self.bar is None:
                    print(f"{self.label}: {total} to do", file=self.stream, flush=True)
                else:
                    self.bar.start()
            self.done, self.total = done, total
            if self.bar is not None:
                self.bar.update(self.task, completed=done, total=total, rate=f"{self._rate():.1f}/s")
            if done >= total:
                self.close()

    def _rate(self) -> float:
        return max(self.done, 0) / max(time.monotonic() - self.started, 1e-6)

    def close(self) -> None:
        with self.lock:
            if self.finished or self.total < 0:
                return
            self.finished = True
            if self.bar is not None:
                return self.bar.stop()
            seconds = time.monotonic() - self.started
            print(f"{self.label}: {self.done}/{self.total} in {seconds:.1f} s ({self._rate():.1f}/s)", file=self.stream)
