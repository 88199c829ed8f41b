"""The embed plan: one row per media_id of the manifest that silver lacks for a model_version
(with, from the same read, the new captions each row's image brings): in the driver up to
DRIVER_PLAN_ROWS, else as a Ray Data job whose rows never reach the driver."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...errors import UserError
from ...store import catalog, layout, storage

DRIVER_PLAN_ROWS = 250_000  # manifest + silver rows the driver plans in memory (bench_plan: 412 MB peak at 217k)


def _read_parquet(files: list[storage.Location], columns: list[str]):
    """A Ray dataset of these Parquet files' columns, read on the data root's own filesystem."""
    import ray

    filesystem = storage.arrow(files[0])[0]
    paths = [storage.arrow(f)[1] for f in files]
    # partitioning=None: silver's dt=… folders must not come back as columns.
    return ray.data.read_parquet(paths, filesystem=filesystem, partitioning=None).select_columns(columns)


def _tagged(batch: pa.Table, embedded: int) -> pa.Table:
    """(media_id, path, embedded): the manifest's rows with 0, silver's ids with 1 and no path."""
    path = batch.column("path") if "path" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    return pa.table(
        {
            "media_id": batch.column("media_id"),
            "path": path,
            "embedded": pa.array(np.full(batch.num_rows, embedded, np.int8)),
        }
    )


def _not_embedded(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("embedded"), 0)).select(["media_id", "path"])


def _manifest_parts(root: storage.Location) -> list[storage.Location]:
    """The committed manifest parts; none is one clear line, before Ray starts."""
    parts = catalog.manifest_parts(root)
    if not parts:
        raise UserError("the manifest is empty; run `rayclip ingest` first")
    return parts


def plan_work(root: storage.Location, model_version: str, limit: int | None = None, force: bool = False):
    """(media_id, path) to embed, one row per media_id (the smallest path among its manifest rows),
    minus those already embedded, sorted by media_id: a Ray dataset. `limit` takes the first rows.

    Up to DRIVER_PLAN_ROWS manifest and silver rows, the driver plans with pyarrow: a Ray Data
    shuffle costs seconds of task start-up however few rows it has. Above, Ray Data plans and the
    rows never come to the driver."""
    import ray

    manifest, silver_files = plan_sources(root, model_version, force)
    planned = planned_in_driver(root, manifest, silver_files, limit)
    return ray.data.from_arrow(planned) if planned is not None else plan_in_ray(manifest, silver_files, limit)


def plan_sources(root: storage.Location, model_version: str, force: bool) -> tuple[list, list]:
    """The manifest parts and the silver files (none with force) a plan reads."""
    return _manifest_parts(root), [] if force else catalog.silver_files(root, model_version)


def planned_in_driver(
    root: storage.Location,
    manifest: list,
    silver_files: list,
    limit: int | None,
    captions_for: str | None = None,
    force: bool = False,
) -> pa.Table | None:
    """plan_work's rows as a table, when the driver plans them (no Ray needed); None when Ray Data must.
    With `captions_for` (a model_version), from the same read of the manifest, each row's new
    captions too (_with_new_captions)."""
    if not plans_in_driver(manifest, silver_files):
        return None
    rows = catalog.read_manifest(root, ["media_id", "path"] + (["caption"] if captions_for else []))
    planned = _plan_in_driver(root, silver_files, rows).slice(0, limit)
    if captions_for and planned.num_rows:
        planned = _with_new_captions(root, captions_for, planned, rows, force)
    return planned


def plan_in_ray(manifest: list, silver_files: list, limit: int | None):
    work = _plan_streaming(manifest, silver_files)
    if limit is not None and limit < work.count():
        work = work.limit(limit).materialize()
    # The plan's blocks are in order now; the embed steps that run on it need not wait for order.
    work.context.execution_options.preserve_order = False
    return work


def plans_in_driver(manifest: list[storage.Location], silver_files: list[storage.Location]) -> bool:
    """Whether plan_work plans these manifest parts and silver files in the driver: the rows their
    Parquet footers count are at most DRIVER_PLAN_ROWS."""
    return sum(_each(lambda f: catalog.parquet_metadata(f).num_rows, manifest + silver_files)) <= DRIVER_PLAN_ROWS


def _each(read: Callable, files: list[storage.Location]) -> list:
    """read(file) for every file, many at once: on an object store each is a round trip."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, files))


def _plan_in_driver(root: storage.Location, silver_files: list[storage.Location], manifest: pa.Table) -> pa.Table:
    unique = manifest.group_by("media_id").aggregate([("path", "min")]).rename_columns(["media_id", "path"])
    if silver_files:
        done = pa.concat_tables(_each(lambda f: catalog.read_parquet(f, ["media_id"]), silver_files)).column("media_id")
        unique = unique.filter(pc.invert(pc.is_in(unique.column("media_id"), value_set=done.combine_chunks())))
    return unique.sort_by("media_id")


def _with_new_captions(root: storage.Location, model_version: str, planned: pa.Table, manifest: pa.Table, force: bool):
    """The planned rows with `captions`: the caption texts the run encodes beside each image, every
    non-blank caption of the planned images that silver lacks for this model_version (all with
    force) on the first row (by media_id) that carries it. Captions of images embedded before are
    left to the caption stage, as are those of images that fail to decode."""
    carried = manifest.filter(pc.is_in(manifest["media_id"], value_set=planned["media_id"]))
    carried = carried.filter(pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(carried["caption"]), ""), True)))
    first = carried.group_by("caption").aggregate([("media_id", "min")])
    stored = None if force else catalog.read_silver(root, model_version, layout.CAPTIONS, ["caption_id"])
    known = set(stored["caption_id"].to_pylist()) if stored is not None else set()
    by_row: dict[str, list[str]] = {}
    for text, owner in zip(first["caption"].to_pylist(), first["media_id_min"].to_pylist()):
        if layout.caption_id(text) not in known:
            by_row.setdefault(owner, []).append(text)
    texts = [by_row.get(media_id, []) for media_id in planned["media_id"].to_pylist()]
    return planned.append_column("captions", pa.array(texts, pa.list_(pa.string())))


def _plan_streaming(manifest: list[storage.Location], silver_files: list[storage.Location]):
    """The manifest and silver's ids are read by Ray Data and grouped by media_id in one sort-based
    aggregation: min(path) and max(embedded) (1 when silver has it); the driver holds block
    references only."""
    from ray.data.aggregate import Max, Min
    from ray.data.context import ShuffleStrategy

    tagged = _read_parquet(manifest, ["media_id", "path"]).map_batches(
        _tagged, batch_format="pyarrow", fn_kwargs={"embedded": 0}, batch_size=None
    )
    if silver_files:
        ids = _read_parquet(silver_files, ["media_id"]).map_batches(
            _tagged, batch_format="pyarrow", fn_kwargs={"embedded": 1}, batch_size=None
        )
        tagged = tagged.union(ids)
    # The sort-based shuffle: Ray tasks only (a hash shuffle's aggregator actors take seconds to start
    # even for a small manifest), and its output is sorted by media_id, so --limit takes the smallest.
    tagged.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Blocks leave in media_id order even when a later one is filtered first (a loaded machine).
    tagged.context.execution_options.preserve_order = True
    grouped = tagged.groupby("media_id").aggregate(
        Min("path", alias_name="path"), Max("embedded", alias_name="embedded")
    )
    return grouped.map_batches(_not_embedded, batch_format="pyarrow", batch_size=None).materialize()
