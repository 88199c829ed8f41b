"""What a run killed mid-way leaves behind, how a live run guards its own, and sweeping the rest.

A run works in its own folder (bronze/downloads/<run_id>/, silver/_staging/<run_id>/,
gold/<mv>/builds/<build_id>/) and holds it while it lives (storage.working: a flock locally, a
lease object on an object store). A folder no live run holds is debris: never read by any layer's
reader, safe to delete. A gold build's folder is the exception once its build.json (the commit
record, written last) exists: then it is a build. Small local files are written under a hidden `.*.tmp` name and renamed
(storage.write_atomic); one still there after TEMP_GRACE_S belonged to a writer that died.
"""

from __future__ import annotations

import time

from . import layout, storage
from .storage import Location

TEMP_GRACE_S = 600.0  # far longer than any rename of a small file takes
WORK_FOLDERS = ("bronze/downloads/*", "silver/_staging/*")
BUILD_FOLDERS = ("gold/*/builds/*",)  # debris only while build.json is missing
TEMP_FILES = ("bronze/manifest/.*.tmp", "bronze/objects/*/.*.tmp", "bronze/runs/.*.tmp", "silver/**/.*.tmp")
GOLD_TEMP_FILES = ("gold/*/.*.tmp", "gold/*/builds/*/.*.tmp")
EVERYTHING = WORK_FOLDERS + BUILD_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES


def find(root: Location, patterns: tuple[str, ...] = EVERYTHING) -> list[Location]:
    """Debris under the data root: unlocked work folders and stale temporary files."""
    now = time.time()
    found = []
    for pattern in patterns:
        for path in storage.glob(root, pattern):
            if pattern in BUILD_FOLDERS and _committed_build(path):
                continue
            if storage.is_dir(path):
                with storage.unless_held(path) as free:
                    if free:
                        found.append(path)
            elif path.name.endswith(".tmp") and now - storage.mtime(path) > TEMP_GRACE_S:
                found.append(path)
    return found


def _committed_build(folder: Location) -> bool:
    # A hidden name is an older version's staging folder, renamed away when it was complete.
    return not folder.name.startswith(".") and storage.exists(layout.build_info_file(folder))


def sweep(root: Location, patterns: tuple[str, ...] = EVERYTHING) -> list[Location]:
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
