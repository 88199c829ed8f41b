"""The rest of a build's files beside its index, build.json last: the caption index, the mapping
(when the build holds it), the tuning queries."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ... import faults
from ...store import catalog, layout, storage
from ...store.catalog import BuildInfo
from ...store.storage import Location
from . import mapping, parts
from .made import NORM_TOLERANCE, Made


@dataclasses.dataclass
class CaptionIndexToWrite:
    """The build's caption index, made and not yet written (write_build writes it; the serving side
    reads it as query.builds.Captions): one vector per distinct caption carried by an indexed image."""

    index: object
    rows: pa.Table  # caption_row i, caption_id, caption, faiss_ids (its images, best clip_score first)


def caption_index(
    root: Location, model_version: str, indexed: pa.Table, scores: pa.Table
) -> CaptionIndexToWrite | None:
    """Captions of the mapping's images (the pairs silver scored), deduplicated by text (caption_id):
    an exact inner-product index over their stored vectors, and the faiss_ids that carry each, best
    clip_score first. None when no indexed image has a scored caption."""
    import faiss

    ids = indexed.select(["media_id", "faiss_id"])
    pairs = scores.join(ids, "media_id", join_type="inner")
    if not pairs.num_rows:
        return None
    pairs = pairs.sort_by([("caption_id", "ascending"), ("clip_score", "descending"), ("faiss_id", "ascending")])
    carriers = pairs.group_by("caption_id", use_threads=False).aggregate([("faiss_id", "list")])
    wanted = carriers["caption_id"]
    stored = catalog.silver_latest(
        root, model_version, layout.CAPTIONS, ["caption_id"], ["caption", "embedding"], "embedded_at", wanted
    )
    rows = stored  # sorted by caption_id; a join cannot carry the vectors along (pyarrow: no fixed_size_list)
    carried = carriers["faiss_id_list"].take(pc.index_in(rows["caption_id"], value_set=carriers["caption_id"]))
    vectors = catalog.vector_matrix(rows)
    parts.check_vectors(vectors, layout.silver_table_dir(root, layout.CAPTIONS), NORM_TOLERANCE)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    table = pa.table(
        {
            "caption_row": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
            "caption_id": rows["caption_id"],
            "caption": rows["caption"],
            "faiss_ids": carried,
        }
    )
    return CaptionIndexToWrite(index, table)


def write_build(
    folder: Location,
    made: Made,
    table: pa.Table | None,
    info: BuildInfo,
    started: float,
    built_s: float,
    captions: CaptionIndexToWrite | None = None,
) -> None:
    """The rest of the build's files, each written whole beside the index files its steps wrote (the
    index itself here when this process holds it; the caption index too, when there is one), then
    build.json: the commit. The caller holds the folder (a concurrent build's sweep leaves it alone)."""
    written = list(made.written)
    if made.index is not None:
        catalog.write_index(layout.index_file(folder), made.index)
        written = [layout.index_file(folder)]
    faults.point("index.build")  # the build half written, without its build.json
    if table is not None:  # else the build's steps wrote it
        written += mapping.write(folder, table)
    with storage.open_output(layout.tuning_file(folder)) as f:
        made.truth.save(f)
    written += [layout.tuning_file(folder)]
    if captions is not None:
        catalog.write_index(layout.caption_index_file(folder), captions.index)
        pair = (layout.caption_mapping_file(folder), layout.caption_mapping_arrow_file(folder))
        catalog.write_served_table(*pair, captions.rows)
        written += [
            layout.caption_index_file(folder),
            layout.caption_mapping_file(folder),
            layout.caption_mapping_arrow_file(folder),
        ]
    # What build.json commits, byte for byte: readers check every file against it.
    info.file_bytes = {f.name: storage.size(f) for f in written}
    info.index_bytes = catalog.index_bytes(info)  # the image index's files, whatever its form
    info.timings = {"build_s": round(built_s, 3), "total_s": round(time.monotonic() - started, 3)}
    info.write(layout.build_info_file(folder))
