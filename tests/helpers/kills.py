"""The CLI in a process of its own, killed with SIGKILL at a named fault point ($RAYCLIP_KILL_AT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from rayclip import faults


def rayclip(*args: str, kill_at: str | None = None, env: dict | None = None, timeout: float = 300):
    """`python -m rayclip.cli ARGS` in its own process; returns (exit code, its output)."""
    extra = {faults.KILL_AT_ENV: kill_at} if kill_at else {}
    cmd = [sys.executable, "-m", "rayclip.cli", *args]
    proc = subprocess.Popen(
        cmd, env=os.environ | extra | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def assert_killed(rc: int, out: str) -> None:
    assert rc == -signal.SIGKILL, f"the fault point was not reached (rc {rc}):\n{out[-2000:]}"
