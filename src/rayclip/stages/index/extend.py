"""An incremental build: CURRENT's index plus only the silver files it has not read, without retraining."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ... import ann
from ...progress import Progress
from ...store import catalog, layout, storage
from ...store.catalog import BuildInfo
from ...store.storage import Location
from . import parts, select
from .full import Shape
from .made import LATENCY_QUERIES, NORM_TOLERANCE, REBUILD_SHARE, RECALL_K, TUNING_QUERIES, Made


def silver_name(root: Location, model_version: str, f: Location) -> str:
    return str(f.relative_to(layout.silver_model_dir(root, model_version)))


def keep_form(root: Location, model_version: str, shape: Shape, retrain: bool) -> Shape:
    """`shape`, or the form and shard count of the CURRENT build when `shape` asks for neither and
    `retrain` is not asked (a plain `rayclip index`): an incremental build and the full build it may
    fall back to keep the base's form; `--retrain` builds in the form asked (one file by default)."""
    current = catalog.current_build(root, model_version)
    if shape.form != "single" or retrain or current is None:
        return shape
    info = catalog.build_info(root, model_version, current)
    return dataclasses.replace(shape, shards=len(info.shards or []) or 1, on_disk=info.form == "ondisk")


def incremental_base(
    root: Location, model_version: str, files: list[Location], index_type: str, retrain: bool, shape: Shape
) -> tuple[BuildInfo | None, str]:
    """build.json of the CURRENT build to extend, or None and why the build starts from scratch."""
    current = catalog.current_build(root, model_version)
    if retrain or current is None:
        return None, "--retrain" if retrain else "first build"
    info = catalog.build_info(root, model_version, current)
    if shape.form != info.form:  # `keep_form` made a plain `rayclip index` ask for the base's form
        return None, f"base build {current} is kept as {info.form!r}, this one asked as {shape.form!r}"
    if info.form == "shards" and shape.shards != len(info.shards):
        return None, f"base build {current} is kept in {len(info.shards)} shards, this one asked for {shape.shards}"
    base_folder = layout.build_dir(root, model_version, current)
    if info.form != "single" and layout.quantizer_file(base_folder).name not in (info.file_bytes or {}):
        return None, f"base build {current} kept as {info.form!r} predates incremental builds in that form"
    names = {silver_name(root, model_version, f) for f in files}
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


LOPSIDED = 2  # an incremental build grows a base's last shard up to this many times the shards' mean size


def _lopsided(shards: list[dict], added: int) -> bool:
    """Whether `added` rows merged into the last of `shards` would make it over LOPSIDED times their mean."""
    total = sum(shard["count"] for shard in shards) + added
    return shards[-1]["count"] + added > LOPSIDED * total / len(shards)


def why_rebuild(made: Made, tuning: ann.Tuning, target_recall: float) -> str:
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


def extend(
    root: Location,
    model_version: str,
    files: list[Location],
    base: BuildInfo,
    into: Location,
    target_recall: float,
    progress: Progress | None = None,
) -> tuple[Made | None, str]:
    """CURRENT's index plus only the silver rows in files it has not seen, without retraining.

    A media_id already indexed whose new vector is newer keeps its faiss_id: its vector is replaced
    (IVF: remove_ids + add_with_ids; flat: overwritten in place), so mapping row i still describes
    faiss_id i. New media_ids get the next faiss_ids, in file-then-row order. A base kept on disk or
    in shards gets its new rows as a new part on its trained quantizer (extend_in_parts), written
    into the new build's folder `into`; it cannot replace a vector.
    """

    folder = layout.build_dir(root, model_version, base.build_id)
    seen = set(base.silver_files)
    new_files = [f for f in files if silver_name(root, model_version, f) not in seen]
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
    if base.form == "shards" and _lopsided(base.shards, int(fresh.sum())):
        shards = len(base.shards)
        return None, f"{fresh.sum()} new rows would make the last of {shards} shards over {LOPSIDED}x their mean"
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
        in_parts = extend_in_parts(base, folder, into, fresh_rows, count, truth, target_recall)
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
    made = Made(index, base.index_type, rows, truth, dropped, base.build_id, int(fresh.sum()), int(replace.sum()))
    if in_parts is not None:
        made.count, made.tuning, made.form, made.shards, made.written = in_parts
    return made, ""


def extend_in_parts(
    base: BuildInfo,
    base_folder: Location,
    into: Location,
    rows: parts.Rows,
    first: int,
    truth: ann.Truth,
    target_recall: float,
) -> tuple[int, ann.Tuning, str, list[dict] | None, list[Location]]:
    """The new rows added as one new part (faiss_ids first..) on the base's trained quantizer, in the base's
    form: merged on disk after the base's lists, or merged into the last of the base's shards (so the
    shard count stays the one asked), the others copied. The part's exact neighbours of the tuning queries
    are merged into `truth`; the result is tuned as a full build's is. Returns (vectors, tuning, form,
    shards, index files written)."""
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
        last = len(shards) - 1
        for k in range(last):
            parts.copy_file(layout.shard_file(base_folder, k), layout.shard_file(into, k))
        if added:  # contiguous: the new faiss_ids start where the last shard's end
            runner.run([(parts.finish_shard, plan, last, [0], layout.shard_file(base_folder, last))], 0)
            shards[last]["count"] += added
        else:
            parts.copy_file(layout.shard_file(base_folder, last), layout.shard_file(into, last))
        [(total, tuning)] = runner.run([(parts.tune_shards, plan, [], *tune, len(shards))], 0)
        written += [layout.shard_file(into, k) for k in range(len(shards))]
    storage.delete(layout.parts_dir(into))
    return total, tuning, base.form, shards, written
