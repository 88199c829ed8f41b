"""Waits with limits of their own, below the test's (pyproject's `timeout`), and subprocess trees
killed whole when theirs runs out: a `rayclip` process that starts its own Ray leaves a raylet, a
GCS and workers behind when only it is killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess

TEST_TIMEOUT_S = 300  # pyproject's [tool.pytest.ini_options] timeout: every wait here stays below it


def run(cmd: list[str], timeout: float, capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: past `timeout` the whole process group is killed
    (SIGKILL), then TimeoutExpired is raised as subprocess.run raises it."""
    if capture_output:
        kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the session `proc` leads (started with start_new_session=True):
    its process group, and Ray's workers, which move to process groups of their own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)


def readline_within(stream, seconds: float) -> str:
    """The next line of a subprocess's pipe, or TimeoutError when none starts within `seconds`."""
    ready, _, _ = select.select([stream], [], [], seconds)
    if not ready:
        raise TimeoutError(f"no line within {seconds} s")
    return stream.readline()
