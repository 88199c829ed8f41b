"""tests/bounded.py's own promises: a subprocess past its limit is killed with every process of its
session, even one that left its process group (as Ray's workers do); a line waited for has a limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import bounded

# A child that starts a grandchild in a process group of its own, says its pid, and sleeps.
SPAWNER = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], process_group=0)
print(grandchild.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has been killed already


def test_a_subprocess_past_its_limit_is_killed_with_its_whole_session(tmp_path):
    out = tmp_path / "out"
    with open(out, "w") as f, pytest.raises(subprocess.TimeoutExpired):
        bounded.run([sys.executable, "-c", SPAWNER], 5, stdout=f)
    grandchild = int(out.read_text().split()[0])
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def test_a_line_waited_for_has_a_limit():
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE) as proc:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            bounded.readline_within(proc.stdout, 1)
        assert time.monotonic() - started < 5
        proc.kill()
