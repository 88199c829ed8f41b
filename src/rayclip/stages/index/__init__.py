"""Gold layer: deduplicated silver vectors → FAISS index + mapping, published atomically.

`build` extends CURRENT when it can (extend.py: only the silver files it has not read, without
retraining; a base on disk or in shards gets a new part on its trained quantizer), else makes a full
build (full.py): the newest row per media_id chosen in tasks (select.py), then the steps of parts.py
(train once, add parts, finish in one file, on disk or in shards) and the mapping written in parts
(mapping.py), as Ray tasks or in this process, into the build's folder. faiss_id i is the i-th chosen
row (file, then row), and mapping.parquet row i says which media_id it is (and its best clip_score
over its captions). publish.py writes the rest: the caption index when silver holds caption vectors
(captions.faiss row j is one distinct caption, captions.parquet row j its text and the faiss_ids that
carry it), the tuning queries, and build.json last.
The same protocol on a local folder and an object store (no rename needed): every file of a build
is written whole into builds/<build_id>/ (the index streamed through storage), build.json last (the
build's commit record: readers list only builds that have it), and only then CURRENT names the
build (one atomic write). A folder without build.json that no live build holds is debris.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import pyarrow.compute as pc

from ... import ann, faults
from ...errors import UserError
from ...model import ModelSpec
from ...options import IndexOptions
from ...progress import Progress
from ...store import catalog, debris, layout, storage
from ...store.catalog import BuildInfo
from ...store.storage import Location
from . import extend, full, mapping, publish
from .made import LATENCY_QUERIES, RECALL_K, TRUTH_DEPTH, TUNING_QUERIES, Made  # noqa: F401


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
    root = storage.resolved(root)
    model_version = catalog.pick_model_version(root, model_version, catalog.silver_model_versions(root), "embeddings")
    files = catalog.silver_files(root, model_version, dt)
    if not files:
        raise UserError(f"no silver files for {model_version}{' on ' + dt if dt else ''}; run `rayclip embed`")
    model_record = catalog.silver_model(root, model_version)
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall {target_recall} must be above 0 and at most 1")
    max_bytes = ann.parse_bytes(max_index_memory)
    shape = extend.keep_form(root, model_version, full.Shape(parallel, part_vectors, shards, on_disk), retrain)
    dim = catalog.parquet_metadata(files[0]).schema.to_arrow_schema().field("embedding").type.list_size

    base, why_full = (
        (None, "--dt picks one partition")
        if dt
        else extend.incremental_base(root, model_version, files, index_type, retrain, shape)
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
            merge=shape.merges(info.count, made.form),  # what choose_type let auto pick from
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
    shape: full.Shape,
    started: float,
    progress: Progress | None,
) -> tuple[Made, ann.Tuning, BuildInfo, str]:
    """Every file of the build in `folder`, build.json last: CURRENT's index extended when it can be,
    else a full build. Returns what was made, its tuning, its build.json and why a full build."""
    made = None
    if base is not None:
        made, why_full = extend.extend(root, model_version, files, base, folder, target_recall, progress)
    if made is not None:
        tuning = made.tuning or ann.tune(made.index, made.truth, target_recall, RECALL_K, LATENCY_QUERIES)
        why_full = extend.why_rebuild(made, tuning, target_recall)
        if why_full:
            for written in made.written:  # an extension in parts wrote its files: the full build starts clean
                storage.delete(written)
            made = None
    rejected = None
    if made is None:
        made = full.fill(root, model_version, files, dim, index_type, max_bytes, shape, folder, target_recall, progress)
        tuning = made.tuning
        fallback = ann.fallback_for(made.index_type) if index_type == "auto" and not tuning.target_met else None
        if fallback:  # the measured recall, not the rule, has the last word
            rejected = {"index_type": made.index_type, f"recall_at_{RECALL_K}": tuning.recall_at_k}
            for written in made.written:  # the refill starts from a clean folder
                storage.delete(written)
            kept = dataclasses.replace(shape, on_disk=made.form == "ondisk")  # auto may have gone on disk
            made = full.fill(
                root, model_version, files, dim, fallback, max_bytes, kept, folder, target_recall, progress
            )
            tuning = made.tuning
    built_s = time.monotonic() - started

    scores = mapping.clip_scores(root, model_version)
    count = made.index.ntotal if made.index is not None else made.count
    if made.rows is not None:  # an incremental build's rows, joined here
        table = mapping.join(made.rows, root, scores)
        rows, unique, ids = table.num_rows, len(pc.unique(table.column("media_id"))), table
    else:  # written by the steps, which counted its distinct media_ids
        table, rows, unique = None, made.mapped, made.unique
        ids = catalog.read_parquet(layout.mapping_file(folder), ["media_id", "faiss_id"]) if scores.num_rows else None
    captions = publish.caption_index(root, model_version, ids, scores) if ids is not None else None
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
        silver_files=[extend.silver_name(root, model_version, f) for f in files],
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
    publish.write_build(folder, made, table, info, started, built_s, captions)
    return made, tuning, info, why_full


def rollback(root: Location | str, model_version: str | None = None) -> tuple[str, str]:
    """Point CURRENT at the build before it; returns (from, to)."""
    root = storage.resolved(root)
    model_version = catalog.pick_indexed(root, model_version)
    current = catalog.current_build(root, model_version)
    ids = catalog.builds(root, model_version)
    earlier = [b for b in ids if current is None or b < current]
    if not earlier:
        raise UserError(f"no build before {current} for {model_version}; nothing to roll back to")
    storage.write_atomic(layout.current_file(root, model_version), earlier[-1] + "\n")
    return current or "", earlier[-1]
