"""Silver's write and commit protocol: its one owner, for embed, captions, tests and benchmarks.

A run writes its files into a silver table's dt partition (Ray Data's writer for the embeddings,
`write_files` otherwise), then `commit` writes one record naming them, after all of them. Until that
record exists no reader sees any of the run's files (catalog reads records, never folder listings),
so a kill at any point leaves silver as before the run or with the whole run in it; a dead run's
files are debris (the run's work folder, `layout.silver_work_dir`, is held while it lives).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults
from . import layout, storage
from .storage import Location


def embeddings_table(media_ids: list[str], vectors: np.ndarray) -> pa.Table:
    """The embeddings table's schema: media_id, embedding fixed_size_list<float32>[dim], embedded_at."""
    dim = vectors.shape[1]
    now = dt.datetime.now(dt.timezone.utc)
    return pa.table(
        {
            "media_id": pa.array(media_ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            "embedded_at": pa.array([now] * len(media_ids), pa.timestamp("us", tz="UTC")),
        }
    )


CAPTION_ROWS_PER_FILE = 100_000  # caption vectors per Parquet file (about 200 MB at 512 dimensions)


def captions_table(caption_ids: pa.Array, captions: pa.Array, vectors: np.ndarray) -> pa.Table:
    """The captions table's schema: caption_id, caption, embedding fixed_size_list<float32>[dim], embedded_at."""
    now = pa.scalar(dt.datetime.now(dt.timezone.utc), pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "caption_id": caption_ids,
            "caption": captions,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
            "embedded_at": pa.array([now.as_py()] * len(vectors), now.type),
        }
    )


def record_model(root: Location, model_version: str, spec: dict) -> None:
    """Which model made a model_version's vectors (ModelSpec.to_dict()): what a build records and a
    query encodes with (catalog.silver_model reads it)."""
    storage.write_json_atomic(layout.silver_model_file(root, model_version), spec)


def write_files(root: Location, model_version: str, table: str, day: str, run_id: str, tables: Iterable[pa.Table]):
    """Each table one Parquet file of this run in the silver table's dt partition (not yet committed)."""
    partition = layout.silver_partition(root, model_version, day, table)
    for task_index, rows in enumerate(tables):
        with storage.open_output(partition / layout.silver_file_name(run_id, table, task_index)) as f:
            pq.write_table(rows, f)


def commit(root: Location, model_version: str, table: str, day: str, run_id: str, stage: str) -> dict | None:
    """Make a run's files in one silver table data: one commit record naming each file with its rows
    and bytes (readers check theirs against it), written after all of them. Returns the record, or
    None when the run wrote no rows. `stage` names the fault point in the window (`<stage>.commit`)."""
    partition = layout.silver_partition(root, model_version, day, table)
    files = [f for f in storage.glob(partition, layout.PARTITION_FILES) if layout.silver_file_run(f.name) == run_id]
    named = []
    for f in files:
        with storage.open_input(f) as opened:
            rows = pq.read_metadata(opened).num_rows
            named.append({"name": f"{partition.name}/{f.name}", "rows": rows, "bytes": storage.file_size(opened)})
        faults.point(f"{stage}.commit")  # some of the run's files checked, no record yet
    record = {"run_id": run_id, "dt": day, "rows": sum(f["rows"] for f in named), "files": named}
    if not record["rows"]:
        return None
    storage.write_json_atomic(layout.silver_commit_file(root, model_version, run_id, table), record)
    return record


def write_run(
    root: Location, model_version: str, day: str, tables: Iterable[pa.Table], table: str = layout.EMBEDDINGS
) -> dict | None:
    """Silver written without Ray (tests, benchmarks): each table one file of a new run, then the
    run's commit record, under the same protocol as embed. Returns the record."""
    run_id = layout.new_run_id()
    with storage.working(layout.silver_work_dir(root, run_id)):
        write_files(root, model_version, table, day, run_id, tables)
        return commit(root, model_version, table, day, run_id, "write")
