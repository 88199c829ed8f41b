"""Gold layer: deduplicated silver vectors → FAISS index + mapping, published atomically.

Two passes over the silver files keep one copy of the vectors in memory (the index itself):
the first reads only (media_id, embedded_at) to choose the newest row per media_id, the second
streams each file's chosen vectors into the index. faiss_id i is the i-th vector added, and
mapping.parquet row i says which media_id it is (and its best clip_score over its captions).
When silver holds caption vectors, the build also carries a caption index: captions.faiss row j is
one distinct caption, captions.parquet row j its text and the faiss_ids that carry it.
The same protocol on a local folder and an object store (no rename needed): every file of a build
is written whole into builds/<build_id>/ (the index streamed through storage), build.json last (the
build's commit record: readers list only builds that have it), and only then CURRENT names the
build (one atomic write). A folder without build.json that no live build holds is debris.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import ann, faults
from ..errors import UserError
from ..model import ModelSpec
from ..options import IndexOptions
from ..progress import Progress
from ..store import catalog, debris, layout, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location

NORM_TOLERANCE = 1e-3
TRAIN_SAMPLE = 100_000  # vectors used to train an index type that needs training (IVF, PQ)
TRAIN_PER_LIST = 16  # ... or this many per inverted list when that is more
RECALL_K = 10
TUNING_QUERIES = 1_000  # held-out vectors whose exact neighbours measure every build
TRUTH_DEPTH = 32  # exact neighbours kept per tuning query, so an incremental build can update them
LATENCY_QUERIES = 300  # single-query searches timed for p50/p99
REBUILD_SHARE = 0.5  # an incremental build adding more than this share of the index retrains instead


@dataclasses.dataclass
class BuildReport:
    build_id: str
    model_version: str
    count: int
    dim: int
    index_type: str
    duplicates_dropped: int
    source_partitions: list[str]
    timings: dict[str, float]
    path: str
    recall_at_10: float
    recall_target_met: bool
    search_params: dict
    index_bytes: int
    base_build: str
    recall_warning: str  # "" when the recall target is met; else the index, its recall and any remedy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choose_rows(files: list[Location]) -> tuple[pa.Table, int]:
    """Per media_id, the (file, row) of its newest embedding, in file-then-row order; and rows dropped."""
    parts = []
    for file_idx, f in enumerate(files):
        t = catalog.read_parquet(f, ["media_id", "embedded_at"])
        parts.append(
            t.append_column("file_idx", pa.array(np.full(t.num_rows, file_idx, np.int32))).append_column(
                "row_idx", pa.array(np.arange(t.num_rows, dtype=np.int64))
            )
        )
    rows = pa.concat_tables(parts).sort_by(
        [("media_id", "ascending"), ("embedded_at", "descending"), ("file_idx", "descending")]
    )
    ids = rows.column("media_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    chosen = rows.filter(pa.array(first)).sort_by([("file_idx", "ascending"), ("row_idx", "ascending")])
    return chosen, rows.num_rows - chosen.num_rows


def _vectors(f: Location, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(catalog.vector_matrix(catalog.read_parquet(f, ["embedding"]))[rows])


def _check_vectors(vectors: np.ndarray, f: Location) -> None:
    if not np.isfinite(vectors).all():
        raise UserError(f"silver file {f.name} holds NaN or infinite vectors; re-embed with --force")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise UserError(f"silver file {f.name} holds vectors that are not L2-normalised; re-embed with --force")


def _read_positions(
    files: list[Location], file_idx: np.ndarray, row_idx: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """The vectors of these chosen rows (sorted positions = faiss_ids), reading only files that hold some."""
    parts = []
    for i, f in enumerate(files):
        rows = row_idx[positions][file_idx[positions] == i]
        if len(rows):
            parts.append(_vectors(f, rows))
    return np.concatenate(parts)


def _sample_positions(count: int, nlist: int | None, trains: bool) -> tuple[np.ndarray, np.ndarray]:
    """Seeded draws: (held-out tuning queries, training sample). Training avoids the queries when
    the set is large enough to spare them."""
    import faiss  # noqa: F401 - faiss first: it and numpy must agree on the BLAS threads

    order = np.random.default_rng(0).permutation(count)
    queries = np.sort(order[:TUNING_QUERIES])
    if not trains:
        return queries, np.zeros(0, np.int64)
    wanted = max(TRAIN_SAMPLE, TRAIN_PER_LIST * (nlist or 0))
    pool = order[len(queries) :] if count >= 2 * len(queries) else order
    return queries, np.sort(pool[:wanted])


def _new_index(index_type: str, dim: int):
    import faiss

    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    try:
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UserError(
            f"unknown --index-type {index_type!r}; use auto, flat or a FAISS factory string (HNSW32, IVF1024,Flat)"
        ) from None
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index)) if ann.nlist_of(index) is not None else None
    if hasattr(ivf, "do_polysemous_training"):
        # index_factory turns on polysemous training for PQ codes: minutes of CPU for a Hamming
        # filter that inner-product search never uses.
        ivf.do_polysemous_training = False
    return index


def _sources(root: Location) -> pa.Table:
    """One row per media_id from the manifest: its first (path, url, caption, size, source, time)
    and how many rows name it."""
    firsts = ["path", "url", "caption", "width", "height", "source", "ingested_at"]
    manifest = catalog.read_manifest(root, ["media_id", *firsts]).sort_by("ingested_at")
    return (
        manifest.group_by("media_id", use_threads=False)
        .aggregate([(name, "first") for name in firsts] + [("url", "count")])
        .rename_columns(["media_id", *firsts, "source_count"])
    )


def _clip_scores(root: Location, model_version: str) -> pa.Table:
    """media_id, caption_id, clip_score: the newest score of every (image, caption) pair in silver."""
    keys = ["media_id", "caption_id"]
    scores = catalog.silver_latest(root, model_version, layout.CLIP_SCORES, keys, ["clip_score"], "scored_at")
    if scores is None:
        return pa.schema([(k, pa.string()) for k in keys] + [("clip_score", pa.float32())]).empty_table()
    return scores


def _mapping(rows: pa.Table, root: Location, scores: pa.Table) -> pa.Table:
    """(faiss_id, media_id, embedded_at) joined with what the manifest says and the best clip_score
    over each media_id's captions (null: none scored), ordered by faiss_id."""
    best = scores.group_by("media_id").aggregate([("clip_score", "max")])
    best = pa.table({"media_id": best["media_id"], "clip_score": best["clip_score_max"]})
    mapping = rows.join(_sources(root), "media_id", join_type="left outer")
    return mapping.join(best, "media_id", join_type="left outer").sort_by("faiss_id")


@dataclasses.dataclass
class _Captions:
    """The build's caption index: one vector per distinct caption carried by an indexed image."""

    index: object
    rows: pa.Table  # caption_row i, caption_id, caption, faiss_ids (its images, best clip_score first)


def _caption_index(root: Location, model_version: str, mapping: pa.Table, scores: pa.Table) -> _Captions | None:
    """Captions of the mapping's images (the pairs silver scored), deduplicated by text (caption_id):
    an exact inner-product index over their stored vectors, and the faiss_ids that carry each, best
    clip_score first. None when no indexed image has a scored caption."""
    import faiss

    ids = mapping.select(["media_id", "faiss_id"])
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
    _check_vectors(vectors, layout.silver_table_dir(root, layout.CAPTIONS))
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
    return _Captions(index, table)


@dataclasses.dataclass
class _Made:
    """An index filled from silver, before tuning and publishing."""

    index: object
    index_type: str
    rows: pa.Table  # faiss_id, media_id, embedded_at
    truth: ann.Truth
    dropped: int
    base_build: str | None = None
    added: int = 0
    replaced: int = 0


def _fill(files: list[Location], dim: int, index_type: str, max_bytes: int, progress: Progress | None = None) -> _Made:
    """A new index over the newest vector of every media_id, streamed one silver file at a time."""
    chosen, dropped = _choose_rows(files)
    count = chosen.num_rows
    if index_type == "auto":
        index_type = ann.choose_index_type(count, dim, max_bytes)
    index = _new_index(index_type, dim)
    file_idx = chosen.column("file_idx").to_numpy()
    row_idx = chosen.column("row_idx").to_numpy()
    queries, training = _sample_positions(count, ann.nlist_of(index), not index.is_trained)
    sample = _read_positions(files, file_idx, row_idx, np.union1d(queries, training))
    positions = np.union1d(queries, training)
    truth = ann.Truth.empty(sample[np.isin(positions, queries)], queries, TRUTH_DEPTH)
    if not index.is_trained:
        index.train(sample[np.isin(positions, training)])
    del sample
    first = 0
    for i, f in enumerate(files):
        vectors = _vectors(f, row_idx[file_idx == i])
        _check_vectors(vectors, f)
        index.add(vectors)
        truth.add(vectors, np.arange(first, first + len(vectors)))
        first += len(vectors)
        if progress:
            progress(i + 1, len(files))
    rows = pa.table(
        {
            "faiss_id": pa.array(np.arange(count, dtype=np.int64)),
            "media_id": chosen.column("media_id"),
            "embedded_at": chosen.column("embedded_at"),
        }
    )
    return _Made(index, index_type, rows, truth, dropped)


def _silver_name(root: Location, model_version: str, f: Location) -> str:
    return str(f.relative_to(layout.silver_model_dir(root, model_version)))


def _incremental_base(
    root: Location, model_version: str, files: list[Location], index_type: str, retrain: bool
) -> tuple[BuildInfo | None, str]:
    """build.json of the CURRENT build to extend, or None and why the build starts from scratch."""
    current = catalog.current_build(root, model_version)
    if retrain or current is None:
        return None, "--retrain" if retrain else "first build"
    info = catalog.build_info(root, model_version, current)
    names = {_silver_name(root, model_version, f) for f in files}
    tuning = layout.tuning_file(layout.build_dir(root, model_version, current))
    if info.silver_files is None or not storage.exists(tuning):
        return None, f"base build {current} predates incremental builds"
    if index_type not in ("auto", info.index_type, info.index_type_asked):
        return None, f"--index-type {index_type} differs from base build {current} ({info.index_type})"
    if not set(info.silver_files) <= names:
        return None, f"silver files of base build {current} are gone"
    return info, ""


def _still_exact(truth: ann.Truth) -> ann.Truth:
    """The tuning queries that still know RECALL_K + 1 exact neighbours after `forget`. The vectors
    added next refill the forgotten slots, after which a query missing a true neighbour (one ranked
    below the TRUTH_DEPTH kept) would pass for whole and misjudge recall."""
    known = (truth.ids >= 0).sum(axis=1) >= min(RECALL_K + 1, truth.ids.shape[1])
    return ann.Truth(truth.queries[known], truth.query_ids[known], truth.ids[known], truth.scores[known])


def _why_rebuild(made: _Made, tuning: ann.Tuning, target_recall: float) -> str:
    """Why an extended index is rebuilt from scratch instead of published, or "" to publish it."""
    if tuning.exact:
        return ""  # exact search: right by construction, nothing measured
    wanted = min(TUNING_QUERIES, made.index.ntotal)  # what a full build measures recall on
    if tuning.queries < wanted:
        return f"recall@{RECALL_K} measured on {tuning.queries} held-out queries, fewer than the {wanted} wanted"
    if not tuning.target_met and ann.nlist_of(made.index) is not None:
        return f"recall@{RECALL_K} {tuning.recall_at_k:.3f} fell below {target_recall}"
    return ""


def _extend(
    root: Location, model_version: str, files: list[Location], base: BuildInfo, progress: Progress | None = None
) -> tuple[_Made | None, str]:
    """CURRENT's index plus only the silver rows in files it has not seen, without retraining.

    A media_id already indexed whose new vector is newer keeps its faiss_id: its vector is replaced
    (IVF: remove_ids + add_with_ids; flat: overwritten in place), so mapping row i still describes
    faiss_id i. New media_ids get the next faiss_ids, in file-then-row order.
    """

    folder = layout.build_dir(root, model_version, base.build_id)
    seen = set(base.silver_files)
    new_files = [f for f in files if _silver_name(root, model_version, f) not in seen]
    base_rows = catalog.read_parquet(layout.mapping_file(folder), ["faiss_id", "media_id", "embedded_at"])
    count = base_rows.num_rows
    if not new_files:
        chosen, dropped = _choose_rows(files[:1])[0].slice(0, 0), 0
    else:
        chosen, dropped = _choose_rows(new_files)
    at = base_rows.column("media_id")
    position = pc.fill_null(pc.index_in(chosen.column("media_id"), value_set=at), -1).to_numpy()
    known = position >= 0
    base_at = base_rows.column("embedded_at").to_numpy()
    new_at = chosen.column("embedded_at").to_numpy()
    replace = known.copy()
    replace[known] = new_at[known] >= base_at[position[known]]
    fresh = ~known
    faiss_ids = np.where(fresh, count + np.cumsum(fresh) - 1, position)
    keep = replace | fresh
    if keep.sum() > REBUILD_SHARE * count:
        return None, f"{keep.sum()} new or changed rows exceed {REBUILD_SHARE:.0%} of the {count} indexed"
    index = catalog.read_index(layout.index_file(folder))
    if replace.any() and not ann.replaceable(index):
        return None, f"{base.index_type} cannot replace the vectors of {replace.sum()} changed media_ids"
    tuning = layout.tuning_file(folder)
    with storage.open_input(tuning, catalog.recorded_size(tuning)) as f:
        truth = ann.Truth.load(f)
    truth.forget(faiss_ids[replace])
    truth = _still_exact(truth)
    file_idx = chosen.column("file_idx").to_numpy()
    row_idx = chosen.column("row_idx").to_numpy()
    for i, f in enumerate(new_files):
        in_file = (file_idx == i) & keep
        if progress:
            progress(i + 1, len(new_files))
        if not in_file.any():
            continue
        vectors = _vectors(f, row_idx[in_file])
        _check_vectors(vectors, f)
        ids, old = faiss_ids[in_file], replace[in_file]
        if old.any():
            ann.replace_vectors(index, ids[old], vectors[old])
        if (~old).any():
            index.add(vectors[~old])  # new media_ids take the next faiss_ids: the numbers add gives them
        truth.add(vectors, ids)
    media_ids = pa.concat_arrays(
        [at.combine_chunks(), chosen.column("media_id").filter(pa.array(fresh)).combine_chunks()]
    )
    embedded = base_at.copy()
    embedded[position[replace]] = new_at[replace]
    rows = pa.table(
        {
            "faiss_id": pa.array(np.arange(len(media_ids), dtype=np.int64)),
            "media_id": media_ids,
            "embedded_at": pa.concat_arrays(
                [
                    pa.array(embedded, base_rows.schema.field("embedded_at").type),
                    chosen.column("embedded_at").filter(pa.array(fresh)).combine_chunks(),
                ]
            ),
        }
    )
    stale = int(known.sum() - replace.sum())
    dropped = base.duplicates_dropped + dropped + int(replace.sum()) + stale
    made = _Made(index, base.index_type, rows, truth, dropped, base.build_id, int(fresh.sum()), int(replace.sum()))
    return made, ""


def build(
    root: Location | str,
    model_version: str | None = IndexOptions.model_version,
    dt: str | None = IndexOptions.dt,
    index_type: str = IndexOptions.index_type,
    max_index_memory: int | str = IndexOptions.max_index_memory,
    target_recall: float = IndexOptions.target_recall,
    retrain: bool = IndexOptions.retrain,
    progress: Progress | None = None,
) -> BuildReport:
    """Build and publish a new gold build; returns what was published.

    Extends CURRENT (same model_version, trained index) with only the new silver files unless
    `retrain`, a `dt` filter, too many new rows, or a recall below `target_recall` or measured on
    fewer held-out queries than a full build's call for a full build. progress(done, total) counts
    silver files added."""
    import faiss  # noqa: F401 - faiss first: it and numpy must agree on the BLAS threads

    started = time.monotonic()
    root = storage.data_root(root)
    model_version = catalog.pick_model_version(root, model_version, catalog.silver_model_versions(root), "embeddings")
    files = catalog.silver_files(root, model_version, dt)
    if not files:
        raise UserError(f"no silver files for {model_version}{' on ' + dt if dt else ''}; run `rayclip embed`")
    spec_file = layout.silver_model_file(root, model_version)
    if not storage.exists(spec_file):
        raise UserError(
            f"silver for {model_version} does not say which model made it; re-embed with `rayclip embed --force`"
        )
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall {target_recall} must be above 0 and at most 1")
    max_bytes = ann.parse_bytes(max_index_memory)
    dim = catalog.parquet_metadata(files[0]).schema.to_arrow_schema().field("embedding").type.list_size

    base, why_full = (
        (None, "--dt picks one partition") if dt else _incremental_base(root, model_version, files, index_type, retrain)
    )
    made = None
    if base is not None:
        made, why_full = _extend(root, model_version, files, base, progress)
    if made is not None:
        tuning = ann.tune(made.index, made.truth, target_recall, RECALL_K, LATENCY_QUERIES)
        why_full = _why_rebuild(made, tuning, target_recall)
        if why_full:
            made = None
    rejected = None
    if made is None:
        made = _fill(files, dim, index_type, max_bytes, progress)
        tuning = ann.tune(made.index, made.truth, target_recall, RECALL_K, LATENCY_QUERIES)
        fallback = ann.fallback_for(made.index_type) if index_type == "auto" and not tuning.target_met else None
        if fallback:  # the measured recall, not the rule, has the last word
            rejected = {"index_type": made.index_type, f"recall_at_{RECALL_K}": tuning.recall_at_k}
            made = _fill(files, dim, fallback, max_bytes, progress)
            tuning = ann.tune(made.index, made.truth, target_recall, RECALL_K, LATENCY_QUERIES)
    built_s = time.monotonic() - started

    scores = _clip_scores(root, model_version)
    mapping = _mapping(made.rows, root, scores)
    captions = _caption_index(root, model_version, mapping, scores)
    index = made.index
    unique = len(pc.unique(mapping.column("media_id")))
    if not index.ntotal == mapping.num_rows == unique:
        raise UserError(
            f"refusing to publish: index has {index.ntotal} vectors, mapping {mapping.num_rows}, unique ids {unique}"
        )

    build_id = layout.new_run_id()
    partitions = sorted({f.parent.name for f in files})
    info = BuildInfo(
        build_id=build_id,
        model_version=model_version,
        model=ModelSpec.from_dict(storage.read_json(spec_file)).to_dict(),
        dim=dim,
        metric="inner_product (cosine on L2-normalised vectors)",
        index_type=made.index_type,
        index_type_asked=index_type,
        auto_rejected=rejected,
        count=int(index.ntotal),
        duplicates_dropped=made.dropped,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source_partitions=partitions,
        source_files=len(files),
        silver_files=[_silver_name(root, model_version, f) for f in files],
        base_build=made.base_build,
        incremental={"added": made.added, "replaced": made.replaced} if made.base_build else None,
        full_build_reason=None if made.base_build else why_full,
        search_params=tuning.params,
        recall=tuning.record(),
        query_ms={"p50": tuning.p50_ms, "p99": tuning.p99_ms, "queries": min(LATENCY_QUERIES, len(made.truth.queries))},
        captions={"count": captions.index.ntotal, "index_type": ann.FLAT} if captions else None,
    )
    folder = layout.build_dir(root, model_version, build_id)
    debris.sweep(root, debris.BUILD_FOLDERS)  # folders of builds killed before their build.json
    _write_build(folder, index, mapping, made.truth, info, started, built_s, captions)
    faults.point("index.publish")  # the build committed, CURRENT still names the previous one
    storage.write_atomic(layout.current_file(root, model_version), build_id + "\n")
    return BuildReport(
        build_id,
        model_version,
        info.count,
        dim,
        made.index_type,
        made.dropped,
        partitions,
        info.timings,
        storage.uri(folder),
        tuning.recall_at_k,
        tuning.target_met,
        tuning.params,
        info.index_bytes,
        made.base_build or f"none (full build: {why_full})",
        ann.shortfall(tuning, made.index_type, index_type == "auto" and not made.base_build, info.count, dim),
    )


def _write_index(loc: Location, index) -> None:
    import faiss

    with storage.open_output(loc) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # streamed, no second copy in memory


def _write_build(
    folder: Location,
    index,
    mapping: pa.Table,
    truth: ann.Truth,
    info: BuildInfo,
    started: float,
    built_s: float,
    captions: _Captions | None = None,
) -> None:
    """Every file of the build, each written whole (the caption index too, when there is one), then
    build.json: the commit. The folder is held while it is written (a concurrent build's sweep leaves
    it alone) and kept when done."""
    with storage.working(folder, keep=True):
        _write_index(layout.index_file(folder), index)
        faults.point("index.build")  # the build half written, without its build.json
        with storage.open_output(layout.mapping_file(folder)) as f:
            pq.write_table(mapping, f)
        with storage.open_output(layout.tuning_file(folder)) as f:
            truth.save(f)
        written = [layout.index_file(folder), layout.mapping_file(folder), layout.tuning_file(folder)]
        if captions is not None:
            _write_index(layout.caption_index_file(folder), captions.index)
            with storage.open_output(layout.caption_mapping_file(folder)) as f:
                pq.write_table(captions.rows, f)
            written += [layout.caption_index_file(folder), layout.caption_mapping_file(folder)]
        info.index_bytes = storage.size(layout.index_file(folder))
        # What build.json commits, byte for byte: readers check every file against it.
        info.file_bytes = {f.name: storage.size(f) for f in written}
        info.timings = {"build_s": round(built_s, 3), "total_s": round(time.monotonic() - started, 3)}
        info.write(layout.build_info_file(folder))


def rollback(root: Location | str, model_version: str | None = None) -> tuple[str, str]:
    """Point CURRENT at the build before it; returns (from, to)."""
    root = storage.data_root(root)
    model_version = catalog.pick_model_version(root, model_version, catalog.gold_model_versions(root), "index")
    current = catalog.current_build(root, model_version)
    ids = catalog.builds(root, model_version)
    earlier = [b for b in ids if current is None or b < current]
    if not earlier:
        raise UserError(f"no build before {current} for {model_version}; nothing to roll back to")
    storage.write_atomic(layout.current_file(root, model_version), earlier[-1] + "\n")
    return current or "", earlier[-1]
