"""The run records of ingest and embed, read (what `rayclip status` and `gc` report)."""

from __future__ import annotations

from .. import layout, storage
from ..storage import Location


def run_records(root: Location) -> list[tuple[str, Location, dict]]:
    """(stage, record location, record) for every ingest and embed run record."""
    records = []
    for stage, folder in (("ingest", layout.ingest_runs_dir(root)), ("embed", layout.embed_runs_dir(root))):
        records += [(stage, path, storage.read_json(path)) for path in storage.glob(folder, layout.RUN_RECORDS)]
    return records
