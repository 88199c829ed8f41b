"""Gold layer: deduplicated silver vectors → FAISS index + mapping, published atomically.

A first pass reads only (media_id, embedded_at) to choose the newest row per media_id; then the
build's steps (parts.py: train once, add parts, finish in one file, on disk or in shards) run as
Ray tasks or in this process, writing into the build's folder. faiss_id i is the i-th chosen row
(file, then row), and mapping.parquet row i says which media_id it is (and its best clip_score over
its captions). An incremental build instead extends CURRENT's single-file index here.
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

from ... import ann, cluster, faults
from ...errors import UserError
from ...model import ModelSpec
from ...options import IndexOptions
from ...progress import Progress
from ...store import catalog, debris, layout, storage
from ...store.catalog import BuildInfo
from ...store.storage import Location
from . import mapping, parts, select

NORM_TOLERANCE = 1e-3
TRAIN_SAMPLE = 100_000  # vectors used to train an index type that needs training (IVF, PQ)
TRAIN_PER_LIST = 16  # ... or this many per inverted list when that is more
RECALL_K = 10
TUNING_QUERIES = 1_000  # held-out vectors whose exact neighbours measure every build
TRUTH_DEPTH = 32  # exact neighbours kept per tuning query, so an incremental build can update them
LATENCY_QUERIES = 300  # single-query searches timed for p50/p99
REBUILD_SHARE = 0.5  # an incremental build adding more than this share of the index retrains instead
MAPPING_ROW_BYTES = 2_000  # a mapping task's memory per row: its rows, the manifest's, the join's copies


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


@dataclasses.dataclass
class _Captions:
    """The build's caption index: one vector per distinct caption carried by an indexed image."""

    index: object
    rows: pa.Table  # caption_row i, caption_id, caption, faiss_ids (its images, best clip_score first)


def _caption_index(root: Location, model_version: str, indexed: pa.Table, scores: pa.Table) -> _Captions | None:
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
    return _Captions(index, table)


@dataclasses.dataclass
class _Made:
    """An index filled from silver, before publishing: held here (an incremental build, `index`) or
    already written into the build's folder by the build's steps (`tuning` measured there)."""

    index: object | None
    index_type: str
    rows: pa.Table | None  # faiss_id, media_id, embedded_at (None: the steps wrote the mapping)
    truth: ann.Truth
    dropped: int
    base_build: str | None = None
    added: int = 0
    replaced: int = 0
    count: int = 0
    tuning: ann.Tuning | None = None
    form: str = "single"
    shards: list[dict] | None = None
    steps: dict | None = None  # how the steps ran: parts, where, and auto's note on the family
    written: list[Location] = dataclasses.field(default_factory=list)  # index and mapping files the steps wrote
    mapped: int = 0  # rows of the mapping the steps wrote


@dataclasses.dataclass(frozen=True)
class _Shape:
    """How a full build runs and keeps its index (IndexOptions' parallel, part_vectors, shards, on_disk)."""

    parallel: str
    part_vectors: int
    shards: int
    on_disk: bool

    @property
    def form(self) -> str:
        return "shards" if self.shards > 1 else "ondisk" if self.on_disk else "single"

    def merges(self, count: int, form: str) -> bool:
        """Whether an index of `count` vectors kept in `form` is merged from parts: then only a type
        whose parts merge (ann.mergeable) can be built."""
        return form != "single" or count > self.part_vectors


def _choose_type(count: int, dim: int, index_type: str, max_bytes: int, shape: _Shape) -> tuple[str, str, str]:
    """(index type, form, why auto chose as it did). A build in several parts, on disk or in shards needs
    a type whose parts merge (ann.mergeable); auto picks one and says so; an index that fits no budget
    in RAM is merged on disk (memory-mapped when served)."""
    form = shape.form
    merge = shape.merges(count, form)
    if index_type != "auto":
        if form != "single" and not ann.mergeable(index_type):
            raise UserError(
                f"--index-type {index_type} cannot be merged on disk or into shards; use an IVF type "
                "without fast-scan or Refine (e.g. IVF4096,SQ6), or auto"
            )
        return index_type, form, ""
    budget = max_bytes * shape.shards if form == "shards" else max_bytes  # a shard fits one server's budget
    if form == "ondisk":
        budget = _UNBOUNDED  # the lists stay on disk
    try:
        chosen = ann.choose_index_type(count, dim, budget, merge)
    except UserError:
        if form != "single":
            raise
        form, merge = "ondisk", True
        chosen = ann.choose_index_type(count, dim, _UNBOUNDED, merge)
        return chosen, form, f"no index of {count} vectors fits --max-index-memory in RAM: merged on disk"
    try:
        unconstrained = ann.choose_index_type(count, dim, budget)
    except UserError:
        unconstrained = chosen
    if unconstrained == chosen:
        return chosen, form, ""
    why = f"{shape.shards} shards" if form == "shards" else "on disk" if form == "ondisk" else "from parts"
    return chosen, form, f"auto took {chosen}, not {unconstrained}, which cannot be merged {why}"


_UNBOUNDED = 1 << 62


def _fill(
    root: Location,
    model_version: str,
    files: list[Location],
    dim: int,
    index_type: str,
    max_bytes: int,
    shape: _Shape,
    folder: Location,
    target_recall: float,
    progress: Progress | None = None,
) -> _Made:
    """A new index over the newest vector of every media_id: trained once on a uniform sample, filled in
    parts, finished in its form and tuned (parts.py's steps, as Ray tasks or here)."""
    counts = [catalog.parquet_metadata(f).num_rows for f in files]
    big = sum(counts) > shape.part_vectors  # more than one part's rows (before duplicates are dropped)
    runner = parts.Runner(shape.parallel == "ray" or (shape.parallel == "auto" and (cluster.joins() or big)))
    file_idx, row_idx, dropped = select.select(runner, folder, files, counts)
    count = len(file_idx)
    index_type, form, note = _choose_type(count, dim, index_type, max_bytes, shape)
    plan = parts.Plan(index_type, dim, folder, form, shape.shards, NORM_TOLERANCE)
    ranges = parts.part_ranges(count, shape.part_vectors, index_type, shape.shards)

    empty = parts.new_index(index_type, dim)  # no vectors: what it needs to be trained on
    queries, training = _sample_positions(count, ann.nlist_of(empty), not empty.is_trained)
    sample = np.union1d(queries, training)
    train = (
        parts.train,
        plan,
        parts.rows_at(files, file_idx, row_idx, sample),
        np.isin(sample, queries),
        np.isin(sample, training),
    )
    [query_vectors] = runner.run([train], parts.vector_bytes(len(sample), dim))
    truth = ann.Truth.empty(query_vectors, queries, TRUTH_DEPTH)

    largest = max(n for _, n in ranges)
    # One copy of the queries for all add tasks (each makes its own Truth from it), not one per task.
    empty_truth = runner.share(ann.Truth.empty(query_vectors, queries, TRUTH_DEPTH))
    adds = [
        (parts.add, plan, i, parts.rows_at(files, file_idx, row_idx, np.arange(first, first + n)), first, empty_truth)
        for i, (first, n) in enumerate(ranges)
    ]
    memory = parts.vector_bytes(largest, dim) + parts.index_memory(index_type, largest, dim)
    for ids, scores in runner.run(adds, memory, progress):
        truth.merge(ids, scores)

    all_parts = list(range(len(ranges)))
    whole = parts.index_memory(index_type, count, dim)
    tune = (truth, target_recall, RECALL_K, LATENCY_QUERIES)
    shards = None
    if form == "single":
        [(total, tuning)] = runner.run([(parts.finish_single, plan, all_parts, *tune)], whole)
        written = [layout.index_file(folder)]
    elif form == "ondisk":
        [(total, tuning)] = runner.run([(parts.finish_ondisk, plan, all_parts, *tune)], whole // len(ranges))
        written = [layout.index_file(folder), layout.index_data_file(folder)]
    else:
        groups = parts.shard_groups(len(ranges), shape.shards)
        runner.run([(parts.finish_shard, plan, k, group) for k, group in enumerate(groups)], whole // shape.shards)
        [(total, tuning)] = runner.run([(parts.tune_shards, plan, all_parts, *tune)], whole)
        written = [layout.shard_file(folder, k) for k in range(len(groups))]
        shards = [
            {"file": f.name, "first": ranges[g[0]][0], "count": sum(ranges[p][1] for p in g)}
            for f, g in zip(written, groups)
        ]
    maps = [
        (
            mapping.map_part,
            root,
            model_version,
            folder,
            i,
            parts.rows_at(files, file_idx, row_idx, np.arange(first, first + n)),
            first,
        )
        for i, (first, n) in enumerate(ranges)
    ]
    runner.run(maps, largest * MAPPING_ROW_BYTES)
    [mapped] = runner.run([(mapping.concat, folder, len(ranges))], parts.MIN_TASK_MEMORY)
    written += [layout.mapping_file(folder), layout.mapping_arrow_file(folder)]
    if form != "single":  # kept: an incremental build adds its rows onto it as new parts
        parts.copy_file(layout.trained_file(folder), layout.quantizer_file(folder))
        written.append(layout.quantizer_file(folder))
    storage.delete(layout.parts_dir(folder))  # trained.faiss and the parts: nothing reads them once merged
    steps = {
        "parts": len(ranges),
        "part_vectors": max(n for _, n in ranges),  # --part-vectors, or less to give each shard a part
        "ran_on": runner.where,
        "nodes": len(runner.nodes) or 1,  # Ray nodes the tasks ran on (1: this process)
        "task_peak_rss_mib": runner.peaks or None,  # per step, each task's (None: ran in this process)
        "auto": note or None,
    }
    return _Made(
        None,
        index_type,
        None,
        truth,
        dropped,
        count=total,
        mapped=mapped,
        tuning=tuning,
        form=form,
        shards=shards,
        steps=steps,
        written=written,
    )


def _silver_name(root: Location, model_version: str, f: Location) -> str:
    return str(f.relative_to(layout.silver_model_dir(root, model_version)))


def _incremental_base(
    root: Location, model_version: str, files: list[Location], index_type: str, retrain: bool, shape: _Shape
) -> tuple[BuildInfo | None, str]:
    """build.json of the CURRENT build to extend, or None and why the build starts from scratch."""
    current = catalog.current_build(root, model_version)
    if retrain or current is None:
        return None, "--retrain" if retrain else "first build"
    info = catalog.build_info(root, model_version, current)
    if shape.form not in ("single", info.form):  # a plain `rayclip index` extends the base in its form
        return None, f"base build {current} is kept as {info.form!r}, this one asked as {shape.form!r}"
    base_folder = layout.build_dir(root, model_version, current)
    if info.form != "single" and layout.quantizer_file(base_folder).name not in (info.file_bytes or {}):
        return None, f"base build {current} kept as {info.form!r} predates incremental builds in that form"
    names = {_silver_name(root, model_version, f) for f in files}
    tuning = layout.tuning_file(base_folder)
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
    count = made.index.ntotal if made.index is not None else made.count
    wanted = min(TUNING_QUERIES, count)  # what a full build measures recall on
    if tuning.queries < wanted:
        return f"recall@{RECALL_K} measured on {tuning.queries} held-out queries, fewer than the {wanted} wanted"
    if not tuning.target_met and (made.index is None or ann.nlist_of(made.index) is not None):
        return f"recall@{RECALL_K} {tuning.recall_at_k:.3f} fell below {target_recall}"
    return ""


def _extend(
    root: Location,
    model_version: str,
    files: list[Location],
    base: BuildInfo,
    into: Location,
    target_recall: float,
    progress: Progress | None = None,
) -> tuple[_Made | None, str]:
    """CURRENT's index plus only the silver rows in files it has not seen, without retraining.

    A media_id already indexed whose new vector is newer keeps its faiss_id: its vector is replaced
    (IVF: remove_ids + add_with_ids; flat: overwritten in place), so mapping row i still describes
    faiss_id i. New media_ids get the next faiss_ids, in file-then-row order. A base kept on disk or
    in shards gets its new rows as a new part on its trained quantizer (_extend_in_parts), written
    into the new build's folder `into`; it cannot replace a vector.
    """

    folder = layout.build_dir(root, model_version, base.build_id)
    seen = set(base.silver_files)
    new_files = [f for f in files if _silver_name(root, model_version, f) not in seen]
    base_rows = catalog.read_parquet(layout.mapping_file(folder), ["faiss_id", "media_id", "embedded_at"])
    count = base_rows.num_rows
    if not new_files:
        chosen, dropped = select.choose(files[:1])[0].slice(0, 0), 0
    else:
        chosen, dropped = select.choose(new_files)
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
    if replace.any() and base.form != "single":
        return None, f"a base kept as {base.form!r} cannot replace the vectors of {replace.sum()} changed media_ids"
    index = catalog.read_index(layout.index_file(folder)) if base.form == "single" else None
    if replace.any() and not ann.replaceable(index):
        return None, f"{base.index_type} cannot replace the vectors of {replace.sum()} changed media_ids"
    tuning = layout.tuning_file(folder)
    with storage.open_input(tuning, catalog.recorded_size(tuning)) as f:
        truth = ann.Truth.load(f)
    truth.forget(faiss_ids[replace])
    truth = _still_exact(truth)
    file_idx = chosen.column("file_idx").to_numpy()
    row_idx = chosen.column("row_idx").to_numpy()
    in_parts = None
    if index is None:
        fresh_rows = parts.Rows(new_files, [row_idx[(file_idx == i) & fresh] for i in range(len(new_files))])
        in_parts = _extend_in_parts(base, folder, into, fresh_rows, count, truth, target_recall)
        new_files = []  # added as a part above
    for i, f in enumerate(new_files):
        in_file = (file_idx == i) & keep
        if progress:
            progress(i + 1, len(new_files))
        if not in_file.any():
            continue
        vectors = parts.read_vectors(parts.Rows([f], [row_idx[in_file]]), NORM_TOLERANCE)
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
    if in_parts is not None:
        made.count, made.tuning, made.form, made.shards, made.written = in_parts
    return made, ""


def _extend_in_parts(
    base: BuildInfo,
    base_folder: Location,
    into: Location,
    rows: parts.Rows,
    first: int,
    truth: ann.Truth,
    target_recall: float,
) -> tuple[int, ann.Tuning, str, list[dict] | None, list[Location]]:
    """The new rows added as one new part (faiss_ids first..) on the base's trained quantizer, in the base's
    form: merged on disk after the base's lists, or kept as one more shard beside copies of the base's
    shards. The part's exact neighbours of the tuning queries are merged into `truth`; the result is tuned
    as a full build's is. Returns (vectors, tuning, form, shards, index files written)."""
    plan = parts.Plan(base.index_type, base.dim, into, base.form, len(base.shards or []), NORM_TOLERANCE)
    runner = parts.Runner(False)
    parts.copy_file(layout.quantizer_file(base_folder), layout.trained_file(into))
    empty = ann.Truth.empty(truth.queries, truth.query_ids, truth.ids.shape[1])
    added = rows.count
    if added:
        [(ids, scores)] = runner.run([(parts.add, plan, 0, rows, first, empty)], 0)
        truth.merge(ids, scores)
    tune = (truth, target_recall, RECALL_K, LATENCY_QUERIES)
    written = [layout.quantizer_file(into)]
    parts.copy_file(layout.quantizer_file(base_folder), layout.quantizer_file(into))
    if base.form == "ondisk":
        [(total, tuning)] = runner.run([(parts.finish_ondisk, plan, [0] if added else [], *tune, base_folder)], 0)
        written += [layout.index_file(into), layout.index_data_file(into)]
        shards = None
    else:
        shards = [dict(shard) for shard in base.shards]
        for k in range(len(shards)):
            parts.copy_file(layout.shard_file(base_folder, k), layout.shard_file(into, k))
        if added:
            runner.run([(parts.finish_shard, plan, len(shards), [0])], 0)
            shards.append({"file": layout.shard_file(into, len(shards)).name, "first": first, "count": added})
        [(total, tuning)] = runner.run([(parts.tune_shards, plan, [], *tune, len(shards))], 0)
        written += [layout.shard_file(into, k) for k in range(len(shards))]
    storage.delete(layout.parts_dir(into))
    return total, tuning, base.form, shards, written


def build(
    root: Location | str,
    model_version: str | None = IndexOptions.model_version,
    dt: str | None = IndexOptions.dt,
    index_type: str = IndexOptions.index_type,
    max_index_memory: int | str = IndexOptions.max_index_memory,
    target_recall: float = IndexOptions.target_recall,
    retrain: bool = IndexOptions.retrain,
    parallel: str = IndexOptions.parallel,
    part_vectors: int = IndexOptions.part_vectors,
    shards: int = IndexOptions.shards,
    on_disk: bool = IndexOptions.on_disk,
    progress: Progress | None = None,
) -> BuildReport:
    """Build and publish a new gold build; returns what was published.

    Extends CURRENT (same model_version, trained index) with only the new silver files unless
    `retrain`, a `dt` filter, too many new rows, or a recall below `target_recall` or measured on
    fewer held-out queries than a full build's call for a full build. A full build trains once, adds
    parts of `part_vectors` in parallel (Ray tasks when `parallel` says so) and keeps the index in one
    file, merged on disk (`on_disk`) or in `shards`. progress(done, total) counts silver files or parts added."""
    import faiss  # noqa: F401 - faiss first: it and numpy must agree on the BLAS threads

    started = time.monotonic()
    root = storage.data_root(root)
    model_version = catalog.pick_model_version(root, model_version, catalog.silver_model_versions(root), "embeddings")
    files = catalog.silver_files(root, model_version, dt)
    if not files:
        raise UserError(f"no silver files for {model_version}{' on ' + dt if dt else ''}; run `rayclip embed`")
    model_record = catalog.silver_model(root, model_version)
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall {target_recall} must be above 0 and at most 1")
    max_bytes = ann.parse_bytes(max_index_memory)
    shape = _Shape(parallel, part_vectors, shards, on_disk)
    dim = catalog.parquet_metadata(files[0]).schema.to_arrow_schema().field("embedding").type.list_size

    base, why_full = (
        (None, "--dt picks one partition")
        if dt
        else _incremental_base(root, model_version, files, index_type, retrain, shape)
    )
    build_id = layout.new_run_id()
    folder = layout.build_dir(root, model_version, build_id)
    debris.sweep(root, debris.BUILD_FOLDERS)  # folders of builds killed before their build.json
    with storage.working(folder, keep=True):  # parts and merged files are written into it from here
        made, tuning, info, why_full = _build_into(
            folder,
            root,
            model_version,
            files,
            model_record,
            dim,
            base,
            why_full,
            index_type,
            max_bytes,
            target_recall,
            shape,
            started,
            progress,
        )
    faults.point("index.publish")  # the build committed, CURRENT still names the previous one
    storage.write_atomic(layout.current_file(root, model_version), build_id + "\n")
    return BuildReport(
        build_id,
        model_version,
        info.count,
        dim,
        made.index_type,
        made.dropped,
        info.source_partitions,
        info.timings,
        storage.uri(folder),
        tuning.recall_at_k,
        tuning.target_met,
        tuning.params,
        info.index_bytes,
        made.base_build or f"none (full build: {why_full})",
        ann.shortfall(
            tuning,
            made.index_type,
            index_type == "auto" and not made.base_build,
            info.count,
            dim,
            max_bytes,
            merge=shape.merges(info.count, made.form),  # what _choose_type let auto pick from
            servers=len(made.shards) if made.shards else 1,
        ),
    )


def _build_into(
    folder: Location,
    root: Location,
    model_version: str,
    files: list[Location],
    model_record: dict,
    dim: int,
    base: BuildInfo | None,
    why_full: str,
    index_type: str,
    max_bytes: int,
    target_recall: float,
    shape: _Shape,
    started: float,
    progress: Progress | None,
) -> tuple[_Made, ann.Tuning, BuildInfo, str]:
    """Every file of the build in `folder`, build.json last: CURRENT's index extended when it can be,
    else a full build. Returns what was made, its tuning, its build.json and why a full build."""
    made = None
    if base is not None:
        made, why_full = _extend(root, model_version, files, base, folder, target_recall, progress)
    if made is not None:
        tuning = made.tuning or ann.tune(made.index, made.truth, target_recall, RECALL_K, LATENCY_QUERIES)
        why_full = _why_rebuild(made, tuning, target_recall)
        if why_full:
            for written in made.written:  # an extension in parts wrote its files: the full build starts clean
                storage.delete(written)
            made = None
    rejected = None
    if made is None:
        made = _fill(root, model_version, files, dim, index_type, max_bytes, shape, folder, target_recall, progress)
        tuning = made.tuning
        fallback = ann.fallback_for(made.index_type) if index_type == "auto" and not tuning.target_met else None
        if fallback:  # the measured recall, not the rule, has the last word
            rejected = {"index_type": made.index_type, f"recall_at_{RECALL_K}": tuning.recall_at_k}
            made = _fill(root, model_version, files, dim, fallback, max_bytes, shape, folder, target_recall, progress)
            tuning = made.tuning
    built_s = time.monotonic() - started

    scores = mapping.clip_scores(root, model_version)
    count = made.index.ntotal if made.index is not None else made.count
    if made.rows is not None:  # an incremental build's rows, joined here
        table = mapping.join(made.rows, root, scores)
        rows, unique, ids = table.num_rows, len(pc.unique(table.column("media_id"))), table
    else:  # written by the steps: one row per media_id, by construction (select.newest)
        table, rows, unique = None, made.mapped, made.mapped
        ids = catalog.read_parquet(layout.mapping_file(folder), ["media_id", "faiss_id"]) if scores.num_rows else None
    captions = _caption_index(root, model_version, ids, scores) if ids is not None else None
    if not count == rows == unique:
        raise UserError(f"refusing to publish: index has {count} vectors, mapping {rows}, unique ids {unique}")

    build_id = folder.name
    partitions = sorted({f.parent.name for f in files})
    info = BuildInfo(
        build_id=build_id,
        model_version=model_version,
        model=ModelSpec.from_dict(model_record).to_dict(),
        dim=dim,
        metric="inner_product (cosine on L2-normalised vectors)",
        index_type=made.index_type,
        index_type_asked=index_type,
        auto_rejected=rejected,
        count=int(count),
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
        form=made.form,
        shards=made.shards,
        steps=made.steps,
    )
    _write_build(folder, made, table, info, started, built_s, captions)
    return made, tuning, info, why_full


def _write_build(
    folder: Location,
    made: _Made,
    table: pa.Table | None,
    info: BuildInfo,
    started: float,
    built_s: float,
    captions: _Captions | None = None,
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
        with storage.open_output(layout.caption_mapping_file(folder)) as f:
            pq.write_table(captions.rows, f)
        catalog.write_arrow(layout.caption_mapping_arrow_file(folder), captions.rows)
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
