"""Reading a committed object: checked against the size its commit record gave (a manifest part's
name, a silver commit record, build.json), so what a store hands back short or empty is refused,
never parsed. Every reader in this package opens committed objects through here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..storage import Location, ShortReadError

# The size each commit record read so far gives the object it names (by URI). A committed object never
# changes, so what a record said holds for the life of the process; every reader below checks it.
RECORDED: dict[str, int] = {}


def remember(loc: Location, size: int | None) -> None:
    if size is not None:
        RECORDED[storage.uri(loc)] = int(size)


def recorded_size(loc: Location) -> int | None:
    """The size a commit record gave this object (once that record was read), else None."""
    return RECORDED.get(storage.uri(loc))


@contextlib.contextmanager
def committed(loc: Location, size: int | None, what: str) -> Iterator[object]:
    """A committed object opened for reading, checked against its recorded size; what cannot be
    parsed (an empty or cut object whose size no record gave this process) is one clear line."""
    size = recorded_size(loc) if size is None else size
    with storage.open_input(loc, size) as f:
        if not storage.file_size(f):
            raise ShortReadError(f"{storage.uri(loc)} is empty; a committed {what} never is")
        try:
            with storage.on_store(loc):  # the store refusing a read: its own line (a StoreError)
                yield f
        except (pa.ArrowInvalid, OSError, RuntimeError) as exc:  # the bytes themselves are not whole
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ShortReadError(f"{storage.uri(loc)} is not a whole {what}: {first}") from exc


def read_parquet(loc: Location, columns: list[str] | None = None, size: int | None = None) -> pa.Table:
    """One committed Parquet file or object (a silver file, a build's mapping), whole or these columns."""
    with committed(loc, size, "Parquet file") as f:
        return pq.read_table(f, columns=columns)


def parquet_metadata(loc: Location, size: int | None = None) -> pq.FileMetaData:
    """A Parquet file's footer (schema, row count): no data read."""
    with committed(loc, size, "Parquet file") as f:
        return pq.read_metadata(f)
