"""silver, read: committed runs, files and model records, the newest row of each key, vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...errors import UserError
from .. import layout, storage
from ..storage import Location
from .committed import read_parquet, remember


def silver_model_versions(root: Location) -> list[str]:
    """Model versions with at least one committed embed run."""
    found = storage.glob(layout.embeddings_dir(root), layout.SILVER_COMMITS)
    return sorted({layout.partition_value(f.parent.parent.name) for f in found})


def silver_commits(root: Location, model_version: str, table: str = layout.EMBEDDINGS) -> list[dict]:
    """The commit records of a model_version's runs into a silver table, oldest first: run_id, dt,
    files (name, rows, bytes), rows.

    A run's Parquet files are data only once its record, written after all of them, exists."""
    folder = layout.silver_model_dir(root, model_version, table)
    committed = storage.glob(layout.silver_commits_dir(root, model_version, table), layout.COMMIT_RECORDS)
    records = [storage.read_json(f) for f in committed]
    for record in records:
        for f in record["files"]:
            remember(folder / f["name"], f["bytes"])
    return records


def silver_model(root: Location, model_version: str) -> dict:
    """silver's record of the model that made a model_version's vectors (ModelSpec.to_dict())."""
    recorded = recorded_model(root, model_version)
    if recorded is None:
        raise UserError(
            f"silver for {model_version} does not say which model made it; re-embed with `rayclip embed --force`"
        )
    return recorded


def recorded_model(root: Location, model_version: str) -> dict | None:
    """silver_model's record, or None when silver has none (nothing embedded under that name yet)."""
    record = layout.silver_model_file(root, model_version)
    return storage.read_json(record) if storage.exists(record) else None


def silver_files(
    root: Location,
    model_version: str,
    day: str | None = None,
    table: str = layout.EMBEDDINGS,
    run_id: str | None = None,
) -> list[Location]:
    """The committed Parquet files of a model_version in a silver table (one dt partition, or all; one
    run's, or every run's), by name."""
    day = layout.check_day(day) if day else None
    folder = layout.silver_model_dir(root, model_version, table)
    commits = [c for c in silver_commits(root, model_version, table) if run_id in (None, c["run_id"])]
    names = [f["name"] for c in commits if day in (None, c["dt"]) for f in c["files"]]
    return sorted((folder / name for name in names), key=str)


def read_silver(
    root: Location, model_version: str, table: str, columns: list[str], run_id: str | None = None
) -> pa.Table | None:
    """These columns of every committed row of a silver table (all days), or of one run's rows; None
    when there are none."""
    files = silver_files(root, model_version, table=table, run_id=run_id)
    return pa.concat_tables([read_parquet(f, columns) for f in files]) if files else None


def silver_latest(
    root: Location, model_version: str, table: str, keys: list[str], columns: list[str], at: str, wanted=None
) -> pa.Table | None:
    """The newest committed row (latest `at`) of each key in a silver table (a rerun with --force adds
    rows, never rewrites one): keys + columns, sorted by key; with `wanted` (values of keys[0]) only
    those, filtered file by file. None when the table has no rows."""
    parts = []
    for f in silver_files(root, model_version, table=table):
        part = read_parquet(f, list(dict.fromkeys([*keys, *columns, at])))
        parts.append(part if wanted is None else part.filter(pc.is_in(part[keys[0]], value_set=wanted)))
    if not parts:
        return None
    newest = newest_per_key(pa.concat_tables(parts), keys, [(at, "descending")])
    return newest.select(list(dict.fromkeys([*keys, *columns])))


def vector_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A silver table's fixed-size-list vectors as one contiguous float32 (rows, dim) matrix."""
    vectors = table[column].combine_chunks()
    return np.ascontiguousarray(
        vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, vectors.type.list_size), dtype=np.float32
    )


def newest_per_key(rows: pa.Table, keys: list[str], newest_first: list[tuple[str, str]]) -> pa.Table:
    """The one rule for "the newest row of each key wins": rows sorted by `keys`, then by
    `newest_first` (sort keys that put the newest row first and break its ties), and the first row of
    each key kept. Keys are compared in Arrow (no Python object per row); two nulls are one key."""
    ordered = rows.sort_by([(key, "ascending") for key in keys] + newest_first)
    first = np.zeros(ordered.num_rows, bool)
    first[:1] = True
    for key in keys:
        column = ordered.column(key).combine_chunks()
        after, before = column.slice(1), column.slice(0, max(len(column) - 1, 0))
        unequal = pc.not_equal(after, before)  # null where either is null
        one_null = pc.xor(pc.is_null(after), pc.is_null(before))
        first[1:] |= pc.if_else(pc.is_null(unequal), one_null, unequal).to_numpy(zero_copy_only=False)
    return ordered.filter(pa.array(first))
