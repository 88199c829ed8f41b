"""bronze, read: the committed manifest (and its one writer of a part) and the stored objects."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import NoObjectError
from .. import layout, storage
from ..storage import Location
from .committed import committed, remember

MANIFEST_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("size_bytes", pa.int64()),
        ("source", pa.string()),
        ("run_id", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)


def manifest_parts(root: Location) -> list[Location]:
    """The committed manifest parts: each is one object written whole under a name that records its
    size, so listed means committed."""
    parts = storage.glob(layout.manifest_dir(root), layout.MANIFEST_PARTS)
    for part in parts:
        remember(part, layout.manifest_part_size(part.name))
    return parts


def read_manifest(root: Location, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest (every committed part), or an empty table with its schema."""
    parts = manifest_parts(root)
    if not parts:
        schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    tables = []
    for part in parts:
        with committed(part, None, "manifest part") as f:
            tables.append(pq.read_table(f, columns=columns, schema=MANIFEST_SCHEMA))
    return pa.concat_tables(tables)


def iter_manifest(root: Location, columns: list[str] | None = None, batch_rows: int = 4096) -> Iterator[pa.RecordBatch]:
    """The manifest a batch at a time, part after part: one batch in memory however large it is (export)."""
    for part in manifest_parts(root):
        with committed(part, None, "manifest part") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def write_manifest_part(
    root: Location, run_id: str, number: int, rows: pa.Table, row_group_size: int | None = None
) -> Location:
    """An ingest run's `number`th manifest part, written whole under the name that records its size."""
    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer, row_group_size=row_group_size)
    data = memoryview(buffer.getvalue())
    part = layout.manifest_part(root, run_id, number, len(data))
    storage.write_atomic(part, data)
    return part


def find_object(root: Location, media_id: str) -> Location:
    """The stored image of a media_id, whatever its extension; NoObjectError when the store has none."""
    found = storage.glob(layout.objects_dir(root), layout.object_glob(media_id))
    if not found:
        raise NoObjectError(f"no image {media_id}")
    return found[0]


MISSING_OBJECT = "missing object"  # the manifest names it, the store does not hold it
CHANGED_OBJECT = "object changed since ingest"  # its bytes no longer hash to its media_id
OBJECT_READS = 2  # a short or wrong read from a store is read once more before the row fails


class Refused(NamedTuple):
    """Why a sample or a stored object is not taken, travelling where its bytes or its candidate
    would: the reason is what a report's `failed` counts it under."""

    reason: str


def read_object(root: storage.Location, path: str, media_id: str) -> bytes | Refused:
    """A bronze object's bytes, only when they hash to its media_id (the name *is* the content's hash,
    so no short, empty or rotten read is ever used), else why not. A store that gives up raises StoreError."""
    try:
        for _ in range(OBJECT_READS):
            data = storage.read_bytes(root / path)
            if hashlib.sha256(data).hexdigest() == media_id:
                return data
    except FileNotFoundError:
        return Refused(MISSING_OBJECT)
    return Refused(CHANGED_OBJECT)
