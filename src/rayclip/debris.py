"""What a run killed mid-way leaves behind, how a live run guards its own, and sweeping the rest.

A run works in its own folder (bronze/downloads/<run_id>/, silver/_staging/<run_id>/, a hidden
gold/<mv>/builds/.<build_id>.tmp/) and holds an exclusive flock on it while it lives. The kernel
drops the lock when the process dies, even by kill -9, so an unlocked work folder is debris: never
read by any layer's reader, safe to delete. Small files are written under a hidden `.*.tmp` name and
renamed (layout.write_atomic); one still there after TEMP_GRACE_S belonged to a writer that died.
Locks are local-filesystem locks: the data root is a local path (or a mount every writer shares).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

TEMP_GRACE_S = 600.0  # far longer than any rename of a small file takes
WORK_FOLDERS = ("bronze/downloads/*", "silver/_staging/*", "gold/*/builds/.*.tmp")
TEMP_FILES = ("bronze/manifest/.*.tmp", "bronze/objects/*/.*.tmp", "bronze/runs/.*.tmp", "silver/**/.*.tmp")
GOLD_TEMP_FILES = ("gold/*/.*.tmp", "gold/*/builds/*/.*.tmp")


@contextlib.contextmanager
def working(folder: Path) -> Iterator[Path]:
    """Create a run's work folder, lock it while the run lives, and remove what is left of it after."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # it may have been renamed into place already
        os.close(fd)


@contextlib.contextmanager
def _unless_locked(folder: Path) -> Iterator[bool]:
    """True (holding the lock) when no live run holds the folder; False when one does."""
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


def find(root: Path, patterns: tuple[str, ...] = WORK_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES) -> list[Path]:
    """Debris under the data root: unlocked work folders and stale temporary files."""
    now = time.time()
    found = []
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_dir():
                with _unless_locked(path) as free:
                    if free:
                        found.append(path)
            elif path.name.endswith(".tmp") and now - path.stat().st_mtime > TEMP_GRACE_S:
                found.append(path)
    return found


def sweep(root: Path, patterns: tuple[str, ...] = WORK_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES) -> list[Path]:
    """Delete the debris `find` reports (rechecking each folder's lock); returns what was removed."""
    removed = []
    for path in find(root, patterns):
        if path.is_dir():
            with _unless_locked(path) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
