"""One build per test run, whatever the xdist workers: the first worker that asks builds it, the
others wait for its pickled result.

Each xdist worker is a process with session fixtures of its own, so a session fixture is built once
per worker. A store every test only reads (the gold store: an ingest, two embeds and an index, most
of a minute) is built once per run instead: under a file lock in the folder all workers of the run
share (pytest's base temp folder's parent), the first worker builds it into a folder of its own and
pickles what the fixture returns beside it; a worker that asks later waits on the lock, then reads the
pickle. The result holds paths into the shared folder, so every worker reads the same files.
"""

from __future__ import annotations

import fcntl
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BUILD_WAIT_S = 240  # for another worker's build of a shared store: below the test's own timeout


def _locked(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def built_once(run_dir: Path, name: str, build: Callable[[Path], object]) -> object:
    """build(folder) by the first worker of the run that asks; its result, pickled, for every worker
    (the others wait on the lock until it is there)."""
    result = run_dir / f"{name}.pickle"
    with open(run_dir / f"{name}.lock", "w") as lock:
        deadline = time.monotonic() + BUILD_WAIT_S
        while not _locked(lock):
            assert time.monotonic() < deadline, f"{name}: another worker held the build for {BUILD_WAIT_S} s"
            time.sleep(0.5)
        if not result.exists():  # a folder of its own each try: a failed build leaves its debris aside
            result.write_bytes(pickle.dumps(build(Path(tempfile.mkdtemp(prefix=name, dir=run_dir)))))
    return pickle.loads(result.read_bytes())
