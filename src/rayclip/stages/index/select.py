"""Which silver rows a full build indexes: per media_id, the (file, row) of its newest embedding.

Two steps, run as Ray tasks or inline (parts.Runner), so no process ever sorts every id:
- bucket: one task per group of silver files reads (media_id, embedded_at) and writes them with their
  (file, row) into `buckets` files by a hash of media_id (layout.bucket_file), so every row of one
  media_id lands in one bucket;
- newest: one task per bucket keeps each media_id's newest row and returns only their (file, row)
  keys, 8 bytes a row. The driver sorts the keys: faiss_id i is the i-th chosen row, file then row.
Ties keep what one sort of all rows would: the later file, then the first row of a file.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ... import faults
from ...store import catalog, layout, storage
from ...store.storage import Location

BUCKET_ROWS = 2_000_000  # silver rows per bucket: a newest task holds ~100 bytes a row
GROUP_ROWS = 4_000_000  # silver rows read by one bucket task
ROW_BITS = 40  # a key is file << ROW_BITS | row: files of up to 2^40 rows, 2^23 files


def newest(rows: pa.Table) -> tuple[pa.Table, int]:
    """The rows (media_id, embedded_at, file_idx, row_idx) that are each media_id's newest, in
    file-then-row order; and how many rows were dropped."""
    newest = catalog.newest_per_key(rows, ["media_id"], [("embedded_at", "descending"), ("file_idx", "descending")])
    chosen = newest.sort_by([("file_idx", "ascending"), ("row_idx", "ascending")])
    return chosen, rows.num_rows - chosen.num_rows


def read_ids(files: list[Location], first_file: int = 0) -> pa.Table:
    """(media_id, embedded_at, file_idx, row_idx) of every row of these files, numbered from first_file."""
    tables = []
    for i, f in enumerate(files):
        t = catalog.read_parquet(f, ["media_id", "embedded_at"])
        tables.append(
            t.append_column("file_idx", pa.array(np.full(t.num_rows, first_file + i, np.int32))).append_column(
                "row_idx", pa.array(np.arange(t.num_rows, dtype=np.int64))
            )
        )
    return pa.concat_tables(tables)


def choose(files: list[Location]) -> tuple[pa.Table, int]:
    """newest() over every row of these files, in this process (an incremental build's new files)."""
    return newest(read_ids(files))


def bucket_of(media_ids: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    """A bucket per media_id, the same in every process (Python's hash() is salted per process):
    FNV-1a over its first 8 bytes, which for the contract's hex ids are uniform."""
    array = media_ids.combine_chunks() if isinstance(media_ids, pa.ChunkedArray) else media_ids
    array = array.cast(pa.large_string())
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8) if array.buffers()[2] else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashed = np.full(len(array), 14695981039346656037, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(8):
            byte = np.where(lengths > j, data[np.minimum(starts + j, len(data) - 1)], 0).astype(np.uint64)
            hashed = (hashed ^ byte) * np.uint64(1099511628211)
    return (hashed % np.uint64(buckets)).astype(np.int64)


def bucket(folder: Location, group: int, files: list[Location], first_file: int, buckets: int) -> None:
    """Step: these files' (media_id, embedded_at, file_idx, row_idx), split into bucket files."""
    rows = read_ids(files, first_file)
    owner = bucket_of(rows.column("media_id"), buckets)
    for b in range(buckets):
        with storage.open_output(layout.bucket_file(folder, group, b)) as f:
            pq.write_table(rows.filter(pa.array(owner == b)), f)
    faults.point("index.select")  # a group's bucket files written, no row chosen yet


def newest_keys(folder: Location, b: int, groups: int) -> tuple[np.ndarray, int]:
    """Step: bucket b's chosen rows as (file << ROW_BITS | row) keys, and the rows it dropped."""
    rows = pa.concat_tables(catalog.read_parquet(layout.bucket_file(folder, g, b)) for g in range(groups))
    chosen, dropped = newest(rows)
    files = chosen.column("file_idx").to_numpy().astype(np.int64)
    return (files << ROW_BITS) | chosen.column("row_idx").to_numpy(), dropped


def plan_groups(counts: list[int]) -> list[tuple[int, int]]:
    """(first file, file count) of each bucket task: consecutive files of about GROUP_ROWS rows."""
    groups, first, held = [], 0, 0
    for i, n in enumerate(counts):
        if held and held + n > GROUP_ROWS:
            groups.append((first, i - first))
            first, held = i, 0
        held += n
    groups.append((first, len(counts) - first))
    return groups


def select(runner, folder: Location, files: list[Location], counts: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(file_idx, row_idx) of every chosen row in faiss_id order, and the rows dropped: bucket and newest
    steps on `runner` (parts.Runner); the buckets' files are working files of the build's parts/."""
    total = sum(counts)
    buckets = max(1, math.ceil(total / BUCKET_ROWS))
    groups = plan_groups(counts)
    bucket_calls = [(bucket, folder, g, files[s : s + n], s, buckets) for g, (s, n) in enumerate(groups)]
    runner.run(bucket_calls, _row_bytes(max(sum(counts[s : s + n]) for s, n in groups)))
    newest_calls = [(newest_keys, folder, b, len(groups)) for b in range(buckets)]
    found = runner.run(newest_calls, _row_bytes(math.ceil(2 * total / buckets)))
    keys = np.concatenate([k for k, _ in found]) if found else np.zeros(0, np.int64)
    keys.sort()
    storage.delete(layout.buckets_dir(folder))
    return (keys >> ROW_BITS).astype(np.int32), keys & ((1 << ROW_BITS) - 1), sum(d for _, d in found)


def _row_bytes(rows: int) -> int:
    return rows * 200  # media_id, time, file and row in Arrow, and a sort's copy
