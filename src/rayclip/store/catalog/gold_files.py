"""A build's files: FAISS indexes read, written and merged on disk, and its served tables (Parquet,
the contract, beside an uncompressed Arrow IPC copy that is memory-mapped)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..storage import Location
from .committed import committed


def read_index(loc: Location, size: int | None = None, io_flags: int = 0):
    """A FAISS index from its file or object, streamed through storage (no local copy is made).
    `size`: what its commit recorded, when the caller has it (else the size build.json gave, if read).
    `io_flags`: FAISS's IO flags (IO_FLAG_MMAP, IO_FLAG_ONDISK_SAME_DIR: FAISS opens the file itself,
    so it must be local; a build on an object store is mapped from its local cache)."""
    import faiss

    with committed(loc, size, "FAISS index") as f:
        if io_flags:
            if not storage.is_local(loc):
                raise ValueError(f"{storage.uri(loc)} is not a local file; FAISS maps local files only")
            return faiss.read_index(storage.uri(loc), io_flags)
        return faiss.read_index(faiss.PyCallbackIOReader(f.read, storage.CHUNK_BYTES))


def write_index(loc: Location, index) -> None:
    """A FAISS index written whole to its file or object, streamed (no second copy in memory)."""
    import faiss

    with storage.open_output(loc) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


@contextlib.contextmanager
def merged_on_disk(
    trained,
    parts: list[Location],
    index_loc: Location,
    data_loc: Location,
    base: tuple[Location, Location] | None = None,
) -> Iterator[object]:
    """The empty `trained` IVF index filled with the inverted lists of `parts` (indexes on the same
    quantizer) merged on disk, written to `index_loc` and `data_loc` (its lists: codes and ids) and
    yielded while its lists are still open. `base`: (index file, lists file) of an index merged on disk
    before, whose lists come first (an incremental build adding parts to it). FAISS merges and mmaps
    only local files by name: files are copied to a scratch folder first when they live on an object
    store, the merged files uploaded after. Readers open index_loc with IO_FLAG_ONDISK_SAME_DIR, which
    finds the lists beside it by name."""
    import faiss

    with storage.scratch_folder("rayclip-merge-") as scratch:
        held = [faiss.read_index(str(storage.cached(part, scratch / part.name)), faiss.IO_FLAG_MMAP) for part in parts]
        if base is not None:  # its lists file beside its index file, both local
            lists = storage.cached(base[1], scratch / "base" / base[1].name)
            index = storage.cached(base[0], lists.parent / base[0].name)  # beside its lists: FAISS finds them by name
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
            held.insert(0, faiss.read_index(str(index), flags))
        data = scratch / data_loc.name
        ivf = faiss.extract_index_ivf(trained)
        merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
        sources = faiss.InvertedListsPtrVector()
        for index in held:
            sources.push_back(faiss.extract_index_ivf(index).invlists)
        with storage.quiet_stdout():  # FAISS's C++ prints each resize of the lists file
            ivf.ntotal = trained.ntotal = merged.merge_from_multiple(sources.data(), sources.size(), False)
        ivf.replace_invlists(merged, True)
        merged.this.disown()
        del held, sources
        written = scratch / index_loc.name
        faiss.write_index(trained, str(written))
        storage.upload(data, data_loc)
        storage.upload(written, index_loc)
        yield trained


SERVED_BATCH_ROWS = 65_536  # rows per batch of a served table (a Parquet row group, an Arrow IPC batch)


@contextlib.contextmanager
def served_table_writer(parquet: Location, arrow: Location, schema: pa.Schema) -> Iterator[Callable]:
    """A build's table (its mapping, its caption mapping) written twice, a batch at a time: as Parquet
    (the contract) and as an uncompressed Arrow IPC file (the serving copy map_arrow reads without a
    copy). Yields write(batch)."""
    import pyarrow.ipc as ipc

    with (
        storage.open_output(parquet) as parquet_out,
        pq.ParquetWriter(parquet_out, schema) as parquet_writer,
        storage.open_output(arrow) as arrow_out,
        ipc.new_file(arrow_out, schema) as arrow_writer,
    ):

        def write(batch: pa.RecordBatch) -> None:
            parquet_writer.write_batch(batch)
            arrow_writer.write_batch(batch)

        yield write


def write_served_table(parquet: Location, arrow: Location, table: pa.Table) -> None:
    """A whole table written as served_table_writer writes one."""
    with served_table_writer(parquet, arrow, table.schema) as write:
        for batch in table.to_batches(max_chunksize=SERVED_BATCH_ROWS):
            write(batch)


def map_arrow(loc: Location, size: int | None = None) -> pa.Table:
    """A committed Arrow IPC file memory-mapped: its columns point into the page cache (file-backed
    pages the kernel can reclaim), not into this process's private memory. Local files only."""
    import pyarrow.ipc as ipc

    with committed(loc, size, "Arrow IPC file"):  # its size checked against the commit record
        if not storage.is_local(loc):
            raise ValueError(f"{storage.uri(loc)} is not a local file; only local files are mapped")
        return ipc.open_file(pa.memory_map(storage.uri(loc))).read_all()
