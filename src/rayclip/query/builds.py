"""A committed build loaded for searching: its build.json, its image index (in RAM, mapped, or in
shards, as a Residency says), its mapping and its caption index, and the model its vectors came from.

A build on a local data root is read in place; a build on an object store through this machine's
cache (knn.build_file). A server that maps its index maps the mapping and the caption table too, from
their Arrow IPC serving copies (mapping.arrow, captions.arrow): none of it becomes private memory.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..model import REFERENCE_ALIAS, ModelSpec, resolve
from ..store import catalog, layout, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location
from . import knn
from .knn import LocalIndex, Residency, ShardedIndex
from .mapping import Mapping


@dataclasses.dataclass(frozen=True)
class Captions:
    """A build's caption index: row i is one distinct caption; images[starts[i]:starts[i + 1]] are the
    faiss_ids of the images that carry it, best clip_score first."""

    index: LocalIndex
    texts: pa.ChunkedArray
    starts: np.ndarray
    images: np.ndarray

    @classmethod
    def of(cls, index, table: pa.Table) -> Captions:
        carriers = table.column("faiss_ids")
        starts = np.concatenate([[0], np.cumsum(pc.list_value_length(carriers).to_numpy())]).astype(np.int64)
        images = pc.list_flatten(carriers).to_numpy()  # a view into a mapped table's one batch
        return cls(index, table.column("caption"), starts, images)

    def carrying(self, allowed: np.ndarray, image_count: int) -> np.ndarray:
        """The caption rows carried by at least one of these faiss_ids."""
        kept = np.zeros(image_count, bool)
        kept[allowed] = True
        owner = np.repeat(np.arange(len(self.starts) - 1), np.diff(self.starts))
        return np.unique(owner[kept[self.images]])


@dataclasses.dataclass(frozen=True)
class Build:
    """One loaded build: its build.json, image index and mapping; a Searcher swaps the whole object."""

    build_id: str
    info: BuildInfo
    knn: LocalIndex | ShardedIndex
    mapping: Mapping  # rows by faiss_id, faiss_ids by media_id
    captions: Captions | None = None  # the caption index, when the build carries one
    mapped_bytes: int = 0  # the image index files this process maps rather than holds in RAM


def spec_from_build(info: BuildInfo) -> ModelSpec:
    """The model the build's vectors came from; a local checkpoint must still be the same file."""
    if not info.model:
        raise UserError(f"build {info.build_id} does not record its model; rebuild with `rayclip index`")
    recorded = ModelSpec.from_dict(info.model)
    if recorded.pretrained == REFERENCE_ALIAS:
        spec = resolve(None, REFERENCE_ALIAS)
    elif recorded.checkpoint:
        spec = resolve(recorded.name, recorded.checkpoint)
    else:
        spec = ModelSpec(recorded.name, recorded.pretrained)
    if recorded.checkpoint_sha256 and spec.checkpoint_sha256 != recorded.checkpoint_sha256:
        raise UserError(f"the checkpoint of build {info.build_id} changed on disk since it was embedded; re-embed")
    return dataclasses.replace(spec, version=info.model_version)


def _read_table(local, info: BuildInfo, parquet_of, arrow_of, mapped: bool) -> pa.Table:
    """A build's table (its mapping, its caption mapping): mapped from its Arrow IPC serving copy when
    the index is mapped (a build written before the copies existed is read from Parquet), else read."""
    if mapped and arrow_of(Path()).name in (info.file_bytes or {}):
        return catalog.map_arrow(local(arrow_of, info.file_bytes))
    return catalog.read_parquet(local(parquet_of, info.file_bytes))


def load_build(root: Location, model_version: str, build_id: str, residency: Residency = Residency()) -> Build:
    """A committed build: read in place from a local root, through the local cache from an object store;
    its image index read into RAM or mapped, in this process or in shards elsewhere, as `residency` says."""
    local = functools.partial(knn.build_file, root, model_version, build_id)
    try:
        info = BuildInfo.read(local(layout.build_info_file))
        index = knn.open_index(functools.partial(local, recorded=info.file_bytes), info, residency)
        mapped = residency.maps(info)
        mapping = _read_table(local, info, layout.mapping_file, layout.mapping_arrow_file, mapped)
        captions = None
        if info.captions:
            caption_file = local(layout.caption_index_file, info.file_bytes)
            flags = knn.io_flags("single", info.captions["index_type"], mapped)
            caption_index = LocalIndex(catalog.read_index(caption_file, io_flags=flags), {})
            table = _read_table(local, info, layout.caption_mapping_file, layout.caption_mapping_arrow_file, mapped)
            captions = Captions.of(caption_index, table)
    except storage.ShortReadError as err:  # a file is not what build.json recorded
        rollback = "roll back with `rayclip index --rollback`"
        raise storage.ShortReadError(f"build {build_id} of {model_version} is broken: {err}; {rollback}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"build {build_id} of {model_version} cannot be read: {str(exc).splitlines()[0]}") from None
    ids = mapping.column("faiss_id").to_numpy()
    if not (index.ntotal == mapping.num_rows == info.count) or not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(
            f"build {build_id} of {model_version} is broken: index has {index.ntotal} vectors, "
            f"mapping {mapping.num_rows} rows, build.json {info.count}; roll back with `rayclip index --rollback`"
        )
    return Build(build_id, info, index, Mapping(mapping), captions, residency.mapped_bytes(info))
