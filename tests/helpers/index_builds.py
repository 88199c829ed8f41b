"""A store of made-up vectors in four silver files, and the FAISS side of a build read back plainly
(what a server would search, in whichever form it was built), for the distributed build's tests."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from helpers.silver import clustered, media_ids, write_manifest, write_silver
from rayclip import ann
from rayclip.store import catalog, layout

REFERENCE = "clip_rayclip_ref_reference"
FILES, PER_FILE = 4, 1500
PART_VECTORS = 1600  # four parts over the 6,000 vectors, each crossing a silver file's boundary
INDEX_TYPE = "IVF32,SQ8"
ANCHORS = [0, 1599, 1600, 3333, 5999]  # faiss_ids at both ends of parts


def write_day_files(root: Path) -> None:
    ids, vectors = media_ids(FILES * PER_FILE), clustered(FILES * PER_FILE)
    for f in range(FILES):
        rows = slice(f * PER_FILE, (f + 1) * PER_FILE)
        write_silver(root, f"2026-01-0{f + 1}", ids[rows], vectors[rows])
    write_manifest(root, ids)


def open_build(root: Path, build_id: str):
    """(what a server would search, the FAISS indexes under it, build.json) whichever the build's form
    (plain FAISS: the serving side is not under test here)."""
    folder = layout.build_dir(root, REFERENCE, build_id)
    info = catalog.build_info(root, REFERENCE, build_id)
    if info.form == "shards":
        held = [faiss.read_index(str(folder / shard["file"])) for shard in info.shards]
        shards = faiss.IndexShards(info.dim, False, False)  # successive_ids False: each shard keeps its ids
        for shard in held:
            shards.add_shard(shard)
        return shards, held, info
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if info.form == "ondisk" else 0
    found = faiss.read_index(str(layout.index_file(folder)), flags)
    return found, [found], info


def quantizer_of(index) -> np.ndarray:
    """An IVF index's coarse centroids."""
    quantizer = faiss.extract_index_ivf(index).quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def search(opened: tuple, params: dict, queries: np.ndarray):
    found, held, _ = opened
    for part in held:
        ann.apply_parameters(part, params)
    return found.search(queries, 10)
