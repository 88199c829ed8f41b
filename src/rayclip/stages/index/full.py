"""A full build: the newest row of every media_id chosen (select.py), an index type and form chosen,
then trained once, filled in parts, finished and tuned (parts.py's steps, as Ray tasks or here), and
its mapping written in parts (mapping.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ... import ann, cluster
from ...errors import UserError
from ...progress import Progress
from ...store import catalog, layout, storage
from ...store.storage import Location
from . import mapping, parts, select
from .made import (
    LATENCY_QUERIES,
    MAPPING_ROW_BYTES,
    NORM_TOLERANCE,
    RECALL_K,
    TRAIN_PER_LIST,
    TRAIN_SAMPLE,
    TRUTH_DEPTH,
    TUNING_QUERIES,
    UNIQUE_ROW_BYTES,
    Made,
)


def sample_positions(count: int, nlist: int | None, trains: bool) -> tuple[np.ndarray, np.ndarray]:
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


@dataclasses.dataclass(frozen=True)
class Shape:
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


def choose_type(count: int, dim: int, index_type: str, max_bytes: int, shape: Shape) -> tuple[str, str, str]:
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


def fill(
    root: Location,
    model_version: str,
    files: list[Location],
    dim: int,
    index_type: str,
    max_bytes: int,
    shape: Shape,
    folder: Location,
    target_recall: float,
    progress: Progress | None = None,
) -> Made:
    """A new index over the newest vector of every media_id: trained once on a uniform sample, filled in
    parts, finished in its form and tuned (parts.py's steps, as Ray tasks or here)."""
    counts = [catalog.parquet_metadata(f).num_rows for f in files]
    big = sum(counts) > shape.part_vectors  # more than one part's rows (before duplicates are dropped)
    runner = parts.Runner(shape.parallel == "ray" or (shape.parallel == "auto" and (cluster.joins() or big)))
    file_idx, row_idx, dropped = select.select(runner, folder, files, counts)
    count = len(file_idx)
    index_type, form, note = choose_type(count, dim, index_type, max_bytes, shape)
    plan = parts.Plan(index_type, dim, folder, form, shape.shards, NORM_TOLERANCE)
    ranges = parts.part_ranges(count, shape.part_vectors, index_type, shape.shards)

    empty = parts.new_index(index_type, dim)  # no vectors: what it needs to be trained on
    queries, training = sample_positions(count, ann.nlist_of(empty), not empty.is_trained)
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
    [(mapped, unique)] = runner.run(
        [(mapping.concat, folder, len(ranges))], parts.MIN_TASK_MEMORY + count * UNIQUE_ROW_BYTES
    )
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
    return Made(
        None,
        index_type,
        None,
        truth,
        dropped,
        count=total,
        mapped=mapped,
        unique=unique,
        tuning=tuning,
        form=form,
        shards=shards,
        steps=steps,
        written=written,
    )
