"""Writing shards out, as img2dataset writes them (`webdataset` tars, `parquet`, `folder` as its
`files`): samples are numbered into shards of `per_shard` under img2dataset's keys and names, each
file written whole through storage.open_output (a temporary name and a rename locally, one PUT on an
object store), a shard's metadata `.parquet` after its data, so a reader that finds it finds the
shard whole.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..storage import Location
from . import BYTES_COLUMN, SUCCESS, key_digits, sample_key, shard_name

FLUSH_ROWS = 256  # parquet format: rows (with their bytes) per row group


class ShardWriter:
    """Samples into numbered shards; counts what it wrote. A subclass writes one format: open_shard,
    write_sample, close_shard (and abort_shard when the block fails inside a shard)."""

    def __init__(self, target: Location, per_shard: int, schema: pa.Schema) -> None:
        self.target, self.per_shard, self.schema = target, per_shard, schema
        self.key_digits = key_digits(per_shard)
        self.shard, self.count, self.meta = 0, 0, []
        self.samples = self.image_bytes = self.shards = 0  # written in all

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            if self.count:
                self.abort_shard(exc)
        elif self.count:
            self._finish_shard()

    @property
    def name(self) -> str:
        return shard_name(self.shard)

    def add(self, row: dict, data: bytes, extension: str) -> None:
        """One sample: its bytes (a file of that extension) and its metadata, the schema's columns of row."""
        if self.count == 0:
            self.open_shard()
        key = sample_key(self.shard, self.count, self.key_digits)
        fixed = {"key": key, "status": SUCCESS, "error_message": None, "format": extension}
        meta = {name: _plain(row.get(name)) for name in self.schema.names} | fixed | {"size_bytes": len(data)}
        self.write_sample(key, extension, data, meta)
        self.meta.append(meta)
        self.count += 1
        self.samples += 1
        self.image_bytes += len(data)
        if self.count == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self.close_shard()
        self.shard, self.count, self.meta = self.shard + 1, 0, []
        self.shards += 1

    def write_sidecar(self) -> None:
        """img2dataset's per-shard Parquet of every sample's metadata, written after the shard's data."""
        with storage.open_output(self.target / f"{self.name}.parquet") as f:
            pq.write_table(pa.Table.from_pylist(self.meta, schema=self.schema), f)

    @staticmethod
    def sample_files(key: str, extension: str, data: bytes, meta: dict) -> list[tuple[str, bytes]]:
        """A sample's files in a tar or a folder: its image, its caption, its metadata."""
        caption = (meta.get("caption") or "").encode()
        return [
            (f"{key}.{extension}", data),
            (f"{key}.txt", caption),
            (f"{key}.json", json.dumps(meta, indent=4).encode()),
        ]

    def open_shard(self) -> None: ...

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None: ...

    def close_shard(self) -> None: ...

    def abort_shard(self, exc: tuple) -> None: ...


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, dt.datetime) else value


class TarWriter(ShardWriter):
    """webdataset: a tar per shard, streamed into its output file as samples come."""

    def open_shard(self) -> None:
        self.output = contextlib.ExitStack()
        self.tar = tarfile.open(
            fileobj=self.output.enter_context(storage.open_output(self.target / f"{self.name}.tar")), mode="w"
        )

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        for name, content in self.sample_files(key, extension, data, meta):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), int(time.time()), 0o444
            self.tar.addfile(info, io.BytesIO(content))

    def close_shard(self) -> None:
        self.tar.close()
        self.output.close()
        self.write_sidecar()

    def abort_shard(self, exc: tuple) -> None:
        self.output.__exit__(*exc)  # open_output leaves nothing behind


class FolderWriter(ShardWriter):
    """img2dataset's `files`: a folder per shard, each file written whole."""

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        for name, content in self.sample_files(key, extension, data, meta):
            storage.write_atomic(self.target / self.name / name, content)

    def close_shard(self) -> None:
        self.write_sidecar()


class ParquetWriter(ShardWriter):
    """img2dataset's `parquet`: the metadata and the bytes, FLUSH_ROWS rows per row group."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.with_bytes = self.schema.append(pa.field(BYTES_COLUMN, pa.binary()))

    def open_shard(self) -> None:
        self.output = contextlib.ExitStack()
        file = self.output.enter_context(storage.open_output(self.target / f"{self.name}.parquet"))
        self.writer = pq.ParquetWriter(file, self.with_bytes)
        self.buffer: list[dict] = []

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        self.buffer.append(meta | {BYTES_COLUMN: data})
        if len(self.buffer) == FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.with_bytes))
        self.buffer = []

    def close_shard(self) -> None:
        self._flush()
        self.writer.close()
        self.output.close()

    def abort_shard(self, exc: tuple) -> None:
        # Closed first, or its finaliser writes a footer into the file open_output has closed; a
        # writer whose own write failed may fail again here, and the file goes either way.
        with contextlib.suppress(Exception):
            self.writer.close()
        self.output.__exit__(*exc)


WRITERS = {"webdataset": TarWriter, "parquet": ParquetWriter, "folder": FolderWriter}
