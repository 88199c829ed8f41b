"""The wrapper every stage runs in (`stage`, `run_stage`): the libraries' own output (Ray, img2dataset)
goes to a log file beside the run's record, and the caller's `Hooks` see progress, each stage's
report and other news as typed objects. Nothing here prints: the CLI's hooks draw what the user sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator
from typing import TextIO, TypeVar

from ..progress import Progress
from ..store import layout, storage
from ..store.storage import Location


def _no_progress(label: str, terminal: TextIO) -> Progress | None:
    return None


def _ignore(event: object, terminal: TextIO) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """How a caller watches a run; the library calls these and never prints.

    progress(label, terminal): a stage's (done, total) callback, or None; one with a close()
    method is closed when its stage ends. report(event, terminal): each stage's report as it
    finishes (IngestReport, EmbedReport, BuildReport) and other news (DemoSite, RayDashboard).
    `terminal` is the stream the user sees: while a stage runs, fds 1 and 2 are in its log.
    """

    progress: Callable[[str, TextIO], Progress | None] = _no_progress
    report: Callable[[object, TextIO], None] = _ignore
    verbose: bool = False  # the libraries' own output on the terminal too (it is always in the log)
    terminal_fd: int = 1  # where the user looks: 2 when stdout carries a JSON document

    def terminal(self) -> TextIO:
        return sys.stdout if self.terminal_fd == 1 else sys.stderr


QUIET = Hooks()


class Stage:
    """One running stage as its caller sees it: progress and news on the terminal, and its log."""

    def __init__(self, hooks: Hooks, terminal: TextIO, log: Location | None) -> None:
        self.hooks, self.terminal, self.log = hooks, terminal, log
        self._progress: list[Progress] = []

    def progress(self, label: str) -> Progress | None:
        made = self.hooks.progress(label, self.terminal)
        if made is not None:
            self._progress.append(made)
        return made

    def report(self, event: object) -> None:
        self.hooks.report(event, self.terminal)

    def keep_log_as(self, run_id: str) -> None:
        """Name the log after the run, beside its JSON record (<runs>/<run_id>.log)."""
        if self.log is not None and storage.exists(self.log):
            storage.move(self.log, layout.run_log(self.log.parent, run_id))

    def _close(self) -> None:
        for made in self._progress:
            close = getattr(made, "close", None)
            if close is not None:
                close()  # e.g. the CLI's summary line, even when the count fell short (a failure)


@contextlib.contextmanager
def stage(runs_dir: Location | None, hooks: Hooks = QUIET) -> Iterator[Stage]:
    """Around a library call: with a runs_dir, the libraries' own output goes to a log file there
    (and, hooks.verbose, to the terminal too); progress goes to the hooks either way."""
    with contextlib.ExitStack() as stack:
        terminal, log = hooks.terminal(), None
        if runs_dir is not None:
            from ..store import runlog

            log = layout.run_log(runs_dir, layout.new_run_id())  # renamed after the run by keep_log_as
            terminal = stack.enter_context(runlog.capture(log, hooks.verbose, terminal_fd=hooks.terminal_fd))
        running = Stage(hooks, terminal, log)
        try:
            yield running
        finally:
            running._close()


@dataclasses.dataclass(frozen=True)
class RayDashboard:
    """Ray was started or joined up front; its dashboard's URL (None: the cluster runs none)."""

    url: str | None


def start_ray(running: Stage, dashboard: bool = False) -> None:
    """Start or join Ray (with its dashboard, its logs on the terminal when verbose); the dashboard's
    URL goes to the hooks when one was asked for or an existing cluster was joined."""
    from .. import cluster

    url = cluster.start(dashboard=dashboard, verbose=running.hooks.verbose)
    if dashboard or cluster.joins():
        running.report(RayDashboard(url))


Report = TypeVar("Report")


def run_stage(
    function: Callable[..., Report],
    *args,
    hooks: Hooks = QUIET,
    runs_dir: Location | None = None,
    progress: dict[str, str] | None = None,
    ray: bool = False,
    dashboard: bool = False,
    **kwargs,
) -> Report:
    """function(*args, **kwargs) as one stage, as `rayclip ingest|embed|index` run it: with runs_dir, the
    libraries' output goes to a log kept beside the run's record (<runs_dir>/<run_id>.log); `progress`
    names the function's progress keywords and their labels for hooks.progress; `ray`: the function
    takes a `start_ray` callable, which starts or joins Ray (start_ray) only once it has work; the
    report it returns goes to hooks.report once the stage is over."""
    with stage(runs_dir, hooks) as running:
        given = {key: running.progress(label) for key, label in (progress or {}).items()}
        if ray:
            given["start_ray"] = functools.partial(start_ray, running, dashboard)
        report = function(*args, **kwargs, **given)
    if runs_dir is not None:
        running.keep_log_as(report.run_id)
    hooks.report(report, hooks.terminal())
    return report
