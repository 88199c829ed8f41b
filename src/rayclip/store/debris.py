"""What a run killed mid-way leaves behind, how a live run guards its own, and sweeping the rest.

A run works in its own folder (bronze/downloads/<run_id>/, silver/_work/<run_id>/,
gold/<mv>/builds/<build_id>/) and holds it while it lives (storage.working: a flock locally, a
lease object on an object store). A folder no live run holds is debris: never read by any layer's
reader, safe to delete. A gold build's folder is the exception once its build.json (the commit
record, written last) exists: then it is a build. An embed run's Parquet files sit in their dt
partition from the start, but are data only once the run's commit record names them: a file whose
run neither lives nor committed is debris too. Small local files are written under a hidden `.*.tmp` name and renamed
(storage.write_atomic); one still there after TEMP_GRACE_S belonged to a writer that died.
"""

from __future__ import annotations

import time

from . import layout, storage
from .storage import Location

TEMP_GRACE_S = 600.0  # far longer than any rename of a small file takes
# Which patterns to sweep (layout spells them): a stage sweeps its own kind, `rayclip gc` all.
WORK_FOLDERS = (layout.DOWNLOAD_FOLDERS, layout.SILVER_WORK_FOLDERS)
BUILD_FOLDERS = (layout.BUILD_FOLDERS,)  # debris only while build.json is missing
TEMP_FILES = layout.TEMP_FILES
GOLD_TEMP_FILES = layout.GOLD_TEMP_FILES
SILVER_WORK = layout.SILVER_WORK_FOLDERS
EVERYTHING = WORK_FOLDERS + BUILD_FOLDERS + TEMP_FILES + GOLD_TEMP_FILES


def find(root: Location, patterns: tuple[str, ...] = EVERYTHING) -> list[Location]:
    """Debris under the data root: unlocked work folders, stale temporary files and (with the silver
    work folders' pattern) the Parquet files of embed runs that died before their commit."""
    now = time.time()
    found = uncommitted_silver(root) if SILVER_WORK in patterns else []
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


def uncommitted_silver(root: Location) -> list[Location]:
    """Silver files (of every silver table) of embed runs that are neither live nor committed.

    Listed first, judged after: a live run holds its work folder from before its first file until
    after its commit record, so a listed file whose run holds nothing either was committed (the
    record exists) or belongs to a run that died. Files not named by silver_file_stem are left alone.
    """
    tables = [
        (table, storage.glob(layout.silver_table_dir(root, table), layout.SILVER_FILES))
        for table in layout.SILVER_TABLES
    ]
    dead: dict[tuple[str, str, str], bool] = {}
    found = []
    for table, path in ((table, path) for table, files in tables for path in files):
        run_id = layout.silver_file_run(path.name)
        if run_id is None:
            continue
        model_version = layout.partition_value(path.parent.parent.name)
        if (table, model_version, run_id) not in dead:
            dead[table, model_version, run_id] = not _embed_run_live(root, run_id) and not storage.exists(
                layout.silver_commit_file(root, model_version, run_id, table)
            )
        if dead[table, model_version, run_id]:
            found.append(path)
    return found


def _embed_run_live(root: Location, run_id: str) -> bool:
    folder = layout.silver_work_dir(root, run_id)
    if not storage.exists(folder):
        return False
    with storage.unless_held(folder) as free:
        return not free
