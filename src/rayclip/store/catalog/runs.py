"""The run records: every stage's one writer, and the ingest and embed records read back (what
`rayclip status` and `gc` report)."""

from __future__ import annotations

from typing import Protocol

from .. import layout, storage
from ..storage import Location


class RunReport(Protocol):
    """What a stage's report gives its record: the run's id and the record itself."""

    run_id: str

    def to_dict(self) -> dict: ...


def write_run_record(runs_dir: Location, report: RunReport) -> None:
    """A stage's run record, <runs_dir>/<run_id>.json, written whole (again, each time the report grows)."""
    storage.write_json_atomic(layout.run_record(runs_dir, report.run_id), report.to_dict())


def run_records(root: Location) -> list[tuple[str, Location, dict]]:
    """(stage, record location, record) for every ingest and embed run record."""
    records = []
    for stage, folder in (("ingest", layout.ingest_runs_dir(root)), ("embed", layout.embed_runs_dir(root))):
        records += [(stage, path, storage.read_json(path)) for path in storage.glob(folder, layout.RUN_RECORDS)]
    return records
