"""Every read of a layer: what is committed in bronze, silver and gold, and the run records.

The stages write their own layer and read the others only through here, so they stand side by side:
ingest, embed, index, search, status and the server import the catalog, not each other.

A committed object is read against the size its commit recorded (a manifest part's name, a silver
commit record, build.json), so what a store hands back short or empty is refused, never parsed.
Objects committed before sizes were recorded are read as before, but an empty one is refused too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import NoIndexError, UnknownModelVersionError, UserError
from . import layout, storage
from .storage import Location, ShortReadError

# The size each commit record read so far gives the object it names (by URI). A committed object never
# changes, so what a record said holds for the life of the process; every reader below checks it.
_RECORDED: dict[str, int] = {}


def _remember(loc: Location, size: int | None) -> None:
    if size is not None:
        _RECORDED[storage.uri(loc)] = int(size)


def recorded_size(loc: Location) -> int | None:
    """The size a commit record gave this object (once that record was read), else None."""
    return _RECORDED.get(storage.uri(loc))


@contextlib.contextmanager
def _committed(loc: Location, size: int | None, what: str) -> Iterator[object]:
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


# bronze
def manifest_parts(root: Location) -> list[Location]:
    """The committed manifest parts: each is one object written whole under a name that records its
    size, so listed means committed."""
    parts = storage.glob(layout.manifest_dir(root), layout.MANIFEST_PARTS)
    for part in parts:
        _remember(part, layout.manifest_part_size(part.name))
    return parts


def read_manifest(root: Location, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest (every committed part), or an empty table with its schema."""
    parts = manifest_parts(root)
    if not parts:
        schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    tables = []
    for part in parts:
        with _committed(part, None, "manifest part") as f:
            tables.append(pq.read_table(f, columns=columns, schema=MANIFEST_SCHEMA))
    return pa.concat_tables(tables)


def iter_manifest(root: Location, columns: list[str] | None = None, batch_rows: int = 4096) -> Iterator[pa.RecordBatch]:
    """The manifest a batch at a time, part after part: one batch in memory however large it is (export)."""
    for part in manifest_parts(root):
        with _committed(part, None, "manifest part") as f:
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


def find_object(root: Location, media_id: str) -> Location | None:
    """The stored image of a media_id, whatever its extension; None when the store has none."""
    found = storage.glob(layout.objects_dir(root), layout.object_glob(media_id))
    return found[0] if found else None


# silver
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
            _remember(folder / f["name"], f["bytes"])
    return records


def silver_model(root: Location, model_version: str) -> dict:
    """silver's record of the model that made a model_version's vectors (ModelSpec.to_dict())."""
    record = layout.silver_model_file(root, model_version)
    if not storage.exists(record):
        raise UserError(
            f"silver for {model_version} does not say which model made it; re-embed with `rayclip embed --force`"
        )
    return storage.read_json(record)


def silver_files(
    root: Location, model_version: str, day: str | None = None, table: str = layout.EMBEDDINGS
) -> list[Location]:
    """The committed Parquet files of a model_version in a silver table (one dt partition, or all), by name."""
    day = layout.check_day(day) if day else None
    folder = layout.silver_model_dir(root, model_version, table)
    commits = silver_commits(root, model_version, table)
    names = [f["name"] for c in commits if day in (None, c["dt"]) for f in c["files"]]
    return sorted((folder / name for name in names), key=str)


def read_silver(root: Location, model_version: str, table: str, columns: list[str]) -> pa.Table | None:
    """These columns of every committed row of a silver table (all days); None when it has none."""
    files = silver_files(root, model_version, table=table)
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
    ordered = pa.concat_tables(parts).sort_by([(k, "ascending") for k in keys] + [(at, "descending")])
    first = np.zeros(ordered.num_rows, bool)
    first[:1] = True
    for key in keys:
        values = ordered[key].to_numpy(zero_copy_only=False)
        first[1:] |= values[1:] != values[:-1]
    return ordered.filter(pa.array(first)).select(list(dict.fromkeys([*keys, *columns])))


# gold
@dataclasses.dataclass
class BuildInfo:
    """build.json: what a gold build holds and how it was made. Written last, it is the build's commit
    record. Fields added after the first builds are optional, so every build ever written still reads."""

    build_id: str
    model_version: str
    model: dict  # ModelSpec.to_dict() of the model that made the vectors
    dim: int
    metric: str
    index_type: str
    count: int
    duplicates_dropped: int
    created_at: str
    source_partitions: list[str]
    source_files: int
    index_type_asked: str | None = None
    auto_rejected: dict | None = None  # {"index_type", "recall_at_10"}: auto's first pick, when it missed the target
    silver_files: list[str] | None = None  # None: built before incremental builds
    base_build: str | None = None
    incremental: dict | None = None  # {"added", "replaced"} when the build extended base_build
    full_build_reason: str | None = None
    search_params: dict = dataclasses.field(default_factory=dict)
    recall: dict = dataclasses.field(default_factory=dict)
    query_ms: dict = dataclasses.field(default_factory=dict)
    index_bytes: int | None = None
    file_bytes: dict | None = None  # name -> bytes of each file of the build; None: built before sizes
    captions: dict | None = None  # {"count", "index_type"} of the caption index; None: the build has none
    # How the image index is kept: "single" (index.faiss, read into RAM or mapped), "ondisk" (index.faiss
    # + index.ivfdata, merged on disk), "shards" (shard-NNNNN.faiss, one per `shards` entry).
    form: str = "single"
    shards: list[dict] | None = None  # form "shards": [{"file", "first", "count"}], faiss_ids first..first+count-1
    # How a full build ran: {"parts", "part_vectors" (its largest part's), "ran_on": "ray" | "local", "nodes",
    # "task_peak_rss_mib": {step: [MiB per task]}, "auto": why auto took a family that merges (None: it did not
    # have to)}; None: an incremental build or one from before parts.
    steps: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def recall_at_10(self) -> float | None:
        """What the build measured; 1.0 for exact search (it records `exact` instead); None for a
        build from before measured recall."""
        return 1.0 if self.recall.get("exact") else self.recall.get("recall_at_10")

    @classmethod
    def from_dict(cls, written: dict) -> BuildInfo:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in written.items() if k not in known}
        return cls(**{k: v for k, v in written.items() if k in known}, extra=extra)

    def to_dict(self) -> dict:
        written = dataclasses.asdict(self)
        extra = written.pop("extra")
        return written | extra

    @classmethod
    def read(cls, loc: Location) -> BuildInfo:
        """build.json at `loc`; the sizes it records are checked by every later read of the files
        beside it (the build folder, or a local copy of it)."""
        try:
            info = cls.from_dict(storage.read_json(loc))
        except ValueError as exc:  # an empty or cut build.json (JSONDecodeError)
            raise ShortReadError(f"{storage.uri(loc)} is not a whole build record: {exc}") from None
        for name, size in (info.file_bytes or {}).items():
            _remember(loc.parent / name, size)
        return info

    def write(self, loc: Location) -> None:
        storage.write_json_atomic(loc, self.to_dict())


def index_files(info: BuildInfo) -> list[Callable[[Location], Location]]:
    """The layout functions of the files a build's image index is read from."""
    if info.form == "shards":
        return [lambda folder, k=k: layout.shard_file(folder, k) for k in range(len(info.shards or []))]
    return [layout.index_file] + ([layout.index_data_file] if info.form == "ondisk" else [])


def index_bytes(info: BuildInfo) -> int:
    """The bytes of a build's image index files: what reading it into RAM would hold."""
    recorded = info.file_bytes or {}
    names = [file_of(PurePosixPath()).name for file_of in index_files(info)]
    return sum(recorded.get(name, 0) for name in names) or (info.index_bytes or 0)


def gold_model_versions(root: Location, published: bool = True) -> list[str]:
    """Model versions with a published index (a CURRENT); all that have a gold folder if not `published`."""
    folders = [f for f in storage.children(layout.gold_root(root)) if storage.is_dir(f)]
    return sorted(f.name for f in folders if not published or storage.exists(layout.current_file(root, f.name)))


def builds(root: Location, model_version: str) -> list[str]:
    """Committed builds (build.json written) of a model_version, oldest first (build ids sort in time order)."""
    found = storage.glob(layout.builds_dir(root, model_version), layout.BUILD_INFOS)
    return sorted(f.parent.name for f in found if not f.parent.name.startswith("."))


def build_info(root: Location, model_version: str, build_id: str) -> BuildInfo:
    return BuildInfo.read(layout.build_info_file(layout.build_dir(root, model_version, build_id)))


def read_index(loc: Location, size: int | None = None, io_flags: int = 0):
    """A FAISS index from its file or object, streamed through storage (no local copy is made).
    `size`: what its commit recorded, when the caller has it (else the size build.json gave, if read).
    `io_flags`: FAISS's IO flags (IO_FLAG_MMAP, IO_FLAG_ONDISK_SAME_DIR: FAISS opens the file itself,
    so it must be local; a build on an object store is mapped from its local cache)."""
    import faiss

    with _committed(loc, size, "FAISS index") as f:
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


def read_parquet(loc: Location, columns: list[str] | None = None, size: int | None = None) -> pa.Table:
    """One committed Parquet file or object (a silver file, a build's mapping), whole or these columns."""
    with _committed(loc, size, "Parquet file") as f:
        return pq.read_table(f, columns=columns)


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

    with _committed(loc, size, "Arrow IPC file"):  # its size checked against the commit record
        if not storage.is_local(loc):
            raise ValueError(f"{storage.uri(loc)} is not a local file; only local files are mapped")
        return ipc.open_file(pa.memory_map(storage.uri(loc))).read_all()


def parquet_metadata(loc: Location, size: int | None = None) -> pq.FileMetaData:
    """A Parquet file's footer (schema, row count): no data read."""
    with _committed(loc, size, "Parquet file") as f:
        return pq.read_metadata(f)


def current_build(root: Location, model_version: str) -> str | None:
    """The build CURRENT names (None: nothing published). CURRENT is written whole in one PUT or
    rename, so an empty read is the store's failure, refused rather than taken for a build id."""
    current = layout.current_file(root, model_version)
    if not storage.exists(current):
        return None
    build_id = storage.read_text(current).strip()
    if not build_id:
        raise ShortReadError(f"{storage.uri(current)} read back empty; it always names a build")
    return build_id


def pick_model_version(root: Location, asked: str | None, available: list[str], layer: str) -> str:
    """The asked model_version, or the only one present; else NoIndexError (none present) or
    UnknownModelVersionError (the asked one absent, or several and none asked), naming those present."""
    if not available:
        hint = "run `rayclip embed`" if layer == "embeddings" else "run `rayclip index`"
        raise NoIndexError(f"no {layer} yet under {root}; {hint}")
    if asked in available or (not asked and len(available) == 1):
        return asked or available[0]
    raise UnknownModelVersionError(layer, asked, available)


# run records
def run_records(root: Location) -> list[tuple[str, Location, dict]]:
    """(stage, record location, record) for every ingest and embed run record."""
    records = []
    for stage, folder in (("ingest", layout.ingest_runs_dir(root)), ("embed", layout.embed_runs_dir(root))):
        records += [(stage, path, storage.read_json(path)) for path in storage.glob(folder, layout.RUN_RECORDS)]
    return records


def vector_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A silver table's fixed-size-list vectors as one contiguous float32 (rows, dim) matrix."""
    vectors = table[column].combine_chunks()
    return np.ascontiguousarray(
        vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, vectors.type.list_size), dtype=np.float32
    )


# ---------------------------------------------------------------- bronze objects

MISSING_OBJECT = "missing object"  # the manifest names it, the store does not hold it
CHANGED_OBJECT = "object changed since ingest"  # its bytes no longer hash to its media_id
OBJECT_READS = 2  # a short or wrong read from a store is read once more before the row fails


class Refused(NamedTuple):
    """Why a sample or a stored object is not taken, travelling where its bytes or its candidate
    would: the reason is what a report's `failed` counts it under."""

    reason: str


def read_object(root: storage.Location, path: str, media_id: str) -> tuple[bytes | None, str | None]:
    """A bronze object's bytes, only when they hash to its media_id (the name *is* the content's hash,
    so no short, empty or rotten read is ever used): (bytes, None), or (None, why not). A store that
    gives up raises StoreError."""
    try:
        for _ in range(OBJECT_READS):
            data = storage.read_bytes(root / path)
            if hashlib.sha256(data).hexdigest() == media_id:
                return data, None
    except FileNotFoundError:
        return None, MISSING_OBJECT
    return None, CHANGED_OBJECT
