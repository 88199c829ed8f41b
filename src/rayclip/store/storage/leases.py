"""Which work folders belong to a live run: a run holds its folder while it works (`working`), and a
sweep takes only folders no live run holds (`unless_held`).

Local: an exclusive flock on the folder, which the kernel drops when the process dies, even by
kill -9. Object store: a lease object rewritten every LEASE_BEAT_S; a run that died stops rewriting
it, and after LEASE_STALE_S its folder is debris.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from . import files
from .failures import StoreError
from .locations import Location, is_local

LEASE_NAME = ".lease"
LEASE_BEAT_S = 30.0  # how often a live run on an object store rewrites its lease
LEASE_STALE_S = 180.0  # a lease older than this belonged to a run that died


@contextlib.contextmanager
def working(folder: Location, keep: bool = False) -> Iterator[Location]:
    """Mark a run's work folder live while the block runs, and remove what is left of it after.
    With `keep` the folder is the run's product (a gold build, committed by a file inside it): a
    block that ends without an error leaves it in place and only the lease goes."""
    if is_local(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        except BaseException:
            keep = False  # a product that failed half-way is debris like any work folder
            raise
        finally:
            if not keep:
                files.delete(folder)
            os.close(fd)
        return
    lease, stop = folder / LEASE_NAME, threading.Event()

    def beat() -> None:
        while not stop.wait(LEASE_BEAT_S):
            with contextlib.suppress(OSError, StoreError):  # the next beat tries again
                files.write_atomic(lease, str(time.time()))

    files.write_atomic(lease, str(time.time()))
    beater = threading.Thread(target=beat, name="rayclip-lease", daemon=True)
    beater.start()
    try:
        yield folder
    except BaseException:
        keep = False
        raise
    finally:
        stop.set()
        beater.join()
        files.delete(lease if keep else folder)


@contextlib.contextmanager
def unless_held(folder: Location) -> Iterator[bool]:
    """True when no live run holds `folder` (and, locally, keeps it that way inside the block)."""
    if not is_local(folder):
        lease = folder / LEASE_NAME
        yield not files.exists(lease) or time.time() - files.mtime(lease) > LEASE_STALE_S
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # gone meanwhile
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)
