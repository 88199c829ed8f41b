"""The image index a Searcher asks: one narrow interface, whatever holds the vectors.

A Searcher needs four things of an index: `ntotal`, `d`, `probe(queries, k, allowed, effort)` (one
FAISS top-k at one effort, among the `allowed` faiss_ids when given) and `vectors(ids)` (the stored
vectors read back, for collapse and media_id terms). Two classes give them:

- LocalIndex: one FAISS index in this process, read into RAM or memory-mapped from a local file;
- ShardedIndex: K shards, each holding a contiguous range of faiss_ids (stored with their global
  ids), asked at once and merged with faiss.ResultHeap. A shard is a LocalIndex (a sharded build
  served in one process) or a handle to one in another process (`rayclip serve --ray`).

`search` (below) is the one filtered search over either: it raises the effort of ALL shards at once
until k allowed rows come back, so a sharded build answers exactly as the same index unsharded:
every shard is an IVF index on the build's one trained quantizer, so at one nprobe each scans the
lists the unsharded index would, restricted to its own ids, and the best k of the shards' best k
are the unsharded best k. (A Refine layout re-ranks a shortlist of k_factor*k candidates per index:
K shards re-rank K shortlists, more candidates than the unsharded index does, so their merged top k
may be better than its own but not bit-equal; a build kept in shards is IVF without Refine.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from .. import ann
from ..options import ServeOptions
from ..store import catalog, layout, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location

Probe = tuple[np.ndarray, np.ndarray, bool]  # scores, ids, whether this effort looked everywhere
LocalFile = Callable[[Callable[[Location], Location]], Location]  # a build file (by its layout function), local


class Shard(Protocol):
    """What a ShardedIndex asks of each shard (a LocalIndex, or a handle to one elsewhere)."""

    def probe(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, effort: int) -> Probe: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Residency:
    """How this process holds a build's image index: read into RAM, or memory-mapped from a local
    file (`mmap`, or on its own when its files hold more than `max_index_memory`); a sharded build's
    shards opened here, or reached through `remote(info, shard)` (Ray Serve's deployment handles)."""

    mmap: bool = ServeOptions.mmap
    max_index_memory: str | int = ServeOptions.max_index_memory
    remote: Callable[[BuildInfo, int], Shard] | None = None

    def maps(self, info: BuildInfo) -> bool:
        """Map this build's index rather than read it into RAM? (An on-disk build's lists always are.)"""
        over = catalog.index_bytes(info) > ann.parse_bytes(self.max_index_memory)
        return self.mmap or over or info.form == "ondisk"

    def mapped_bytes(self, info: BuildInfo) -> int:
        """The bytes of this build's index files this process maps (0: in RAM, or in shards elsewhere)."""
        elsewhere = self.remote is not None and info.form == "shards"
        return catalog.index_bytes(info) if self.maps(info) and not elsewhere else 0


class LocalIndex:
    """One FAISS index in this process, searched with the knobs its build tuned. `first`: the
    smallest faiss_id it holds (a shard's; its ids are global, so it looks vectors up by hash)."""

    def __init__(self, index, knobs: dict, first: int = 0):
        import faiss

        self.index, self.knobs = index, knobs
        ann.apply_parameters(index, knobs)
        if ann.nlist_of(index) is not None:  # collapse and media_id terms read stored vectors back by id
            direct = faiss.DirectMap.Array if first == 0 else faiss.DirectMap.Hashtable
            faiss.extract_index_ivf(index).set_direct_map_type(direct)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def d(self) -> int:
        return self.index.d

    def probe(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, effort: int) -> Probe:
        import faiss

        if allowed is None:
            return (*self.index.search(queries, k), True)
        mask = np.zeros(int(allowed.max()) + 1 if len(allowed) else 0, bool)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")
        # Its size in BYTES: FAISS reads bitmap[id >> 3] for every id below 8 × that, so a larger
        # number would read past the array (and keep whatever ids the memory beyond it says).
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params, exhaustive = ann.search_parameters(self.index, self.knobs, selector, effort)
        return (*self.index.search(queries, k, params=params), exhaustive)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64))


class ShardedIndex:
    """Shards holding faiss_ids first..first+count-1 each (`ranges`), asked at once, merged by score."""

    def __init__(self, shards: Sequence[Shard], ranges: Sequence[tuple[int, int]], d: int):
        self.shards, self.ranges, self.d = list(shards), list(ranges), d
        self.ntotal = sum(count for _, count in self.ranges)
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard")

    def _own(self, ids: np.ndarray, shard: int) -> np.ndarray:
        first, count = self.ranges[shard]
        return (ids >= first) & (ids < first + count)

    def probe(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, effort: int) -> Probe:
        import faiss

        asked = [
            (shard, None if allowed is None else allowed[self._own(allowed, s)]) for s, shard in enumerate(self.shards)
        ]
        asked = [(shard, own) for shard, own in asked if own is None or len(own)]  # a shard the filter empties
        found = self._pool.map(lambda pair: pair[0].probe(queries, k, pair[1], effort), asked)
        heap, exhaustive = faiss.ResultHeap(len(queries), k, keep_max=True), True  # inner product: larger is nearer
        for scores, ids, looked_everywhere in found:
            heap.add_result(np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(ids, np.int64))
            exhaustive &= looked_everywhere
        heap.finalize()
        return heap.D, heap.I, exhaustive

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.d), np.float32)
        for s, shard in enumerate(self.shards):
            own = self._own(ids, s)
            if own.any():
                out[own] = shard.vectors(ids[own])
        return out


def search(index, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k in a LocalIndex or ShardedIndex, restricted to `allowed` faiss_ids when given.

    An approximate index can find fewer than k allowed rows near the query (a selective filter):
    it searches again with four times the effort until k come back or it has looked everywhere;
    an HNSW graph that still falls short is searched exactly over the allowed rows."""
    import faiss

    effort = 1
    while True:
        scores, ids, exhaustive = index.probe(queries, k, allowed, effort)
        if allowed is None or (ids >= 0).sum(axis=1).min() >= k or exhaustive:
            break
        effort *= 4
    if allowed is not None and (ids >= 0).sum(axis=1).min() < k:
        vectors = index.vectors(allowed)
        scores, positions = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        ids = allowed[positions]
    return scores, ids


def build_file(
    root: Location, model_version: str, build_id: str, file_of: Callable[[Location], Location], recorded=None
) -> Location:
    """A file of a committed build to read, local: in place from a local root, else this machine's
    copy of it (downloaded once: a committed build never changes), checked against the size
    build.json records (`recorded`) as it is copied, so a short read names the object, not the copy."""
    source = file_of(layout.build_dir(root, model_version, build_id))
    copy = file_of(layout.build_cache(storage.cache_home(), root, model_version, build_id))
    return storage.cached(source, copy, (recorded or {}).get(source.name))


def load_shard(root: Location, model_version: str, build_id: str, shard: int) -> LocalIndex:
    """One shard of a committed build, mapped from its local file (a Ray Serve shard deployment's)."""
    local = functools.partial(build_file, root, model_version, build_id)
    info = BuildInfo.read(local(layout.build_info_file))
    return open_shard(functools.partial(local, recorded=info.file_bytes), info, shard, mapped=True)


def open_index(local: LocalFile, info: BuildInfo, residency: Residency) -> LocalIndex | ShardedIndex:
    """A build's image index as `residency` asks: its files fetched through `local` (read in place
    from a local root, copied once into this machine's cache from an object store)."""
    mapped = residency.maps(info)
    if info.form != "shards":
        for file_of in catalog.index_files(info)[1:]:  # an on-disk index's lists: FAISS opens them beside index.faiss
            local(file_of)
        return read_local(local(layout.index_file), info, mapped)
    ranges = [(shard["first"], shard["count"]) for shard in info.shards]
    if residency.remote is not None:
        shards = [residency.remote(info, k) for k in range(len(ranges))]
    else:
        shards = [open_shard(local, info, k, mapped) for k in range(len(ranges))]
    return ShardedIndex(shards, ranges, info.dim)


def open_shard(local: LocalFile, info: BuildInfo, shard: int, mapped: bool) -> LocalIndex:
    """Shard `shard` of a build kept in shards, in this process (its global ids kept)."""
    return read_local(local(lambda folder: layout.shard_file(folder, shard)), info, mapped, info.shards[shard]["first"])


def read_local(file: Location, info: BuildInfo, mapped: bool, first: int = 0) -> LocalIndex:
    """One local index file read into RAM, or mapped (`mapped`; an on-disk build's lists always are)."""
    flags = io_flags(info.form, info.index_type, mapped)
    return LocalIndex(catalog.read_index(file, io_flags=flags), info.search_params or {}, first)


def io_flags(form: str, index_type: str, mapped: bool) -> int:
    """FAISS's read flags for an index file of `index_type` in a build kept in `form`, mapped or read
    into RAM. IO_FLAG_MMAP maps only an IVF's inverted lists: FAISS 1.15 reads a flat index's vectors
    into RAM under it, and maps them under IO_FLAG_MMAP_IFC (which an IVF refuses combined with it)."""
    import faiss

    if form == "ondisk":  # its lists are mapped by FAISS itself; IO_FLAG_MMAP on top of it crashes
        return faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    if not mapped:
        return 0
    return (faiss.IO_FLAG_MMAP if "IVF" in index_type else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
