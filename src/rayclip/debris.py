"""What a run killed mid-way leaves behind, how a live run guards its own, and sweeping the rest.

A run works in its own folder (bronze/downloads/<run_id>/, silver/_staging/<run_id>/, a hidden
gold/<mv>/builds/.<build_id>.tmp/) and holds it while it lives (storage.working: a flock locally, a
lease object on an object store). A folder no live run holds is debris: never read by any layer's
reader, safe to delete. Small local files are written under a hidden `.*.tmp` name and renamed
(storage.write_atomic); one still there after TEMP_GRACE_S belonged to a writer that died.
"""

from __future__ import annotations

import time

from . import storage
from .storage import Location

TEMP_GRACE_S = 600.0  # far longer than any rename of a small file takes
WORK_FOLDERS = ("bronze/downloads/*", "silver/_staging/*", "gold/*/builds/.*.tmp")
TEMP_FILES = ("bronze/manifest/.*.tmp", "bronze/objects/*/.*.tmp", "bronze/runs/.*.tmp", "silver/**/.*.tmp")
GOLD_TEMP_FILES = ("gold/*/.*.tmp", "gold/*/builds/*/.*.tmp")


def find(root: Location, patterns: tuple[str, ...] = WORK_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES) -> list[Location]:
    """Debris under the data root: unlocked work folders and stale temporary files."""
    now = time.time()
    found = []
    for pattern in patterns:
        for path in storage.glob(root, pattern):
            if storage.is_dir(path):
                with storage.unless_held(path) as free:
                    if free:
                        found.append(path)
            elif path.name.endswith(".tmp") and now - storage.mtime(path) > TEMP_GRACE_S:
                found.append(path)
    return found


def sweep(root: Location, patterns: tuple[str, ...] = WORK_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES) -> list[Location]:
    """Delete the debris `find` reports (rechecking each folder's lock); returns what was removed."""
    removed = []
    for path in find(root, patterns):
        if storage.is_dir(path):
            with storage.unless_held(path) as free:
                if free:
                    storage.delete(path)
                    removed.append(path)
        else:
            storage.delete(path)
            removed.append(path)
    return removed
