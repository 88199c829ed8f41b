"""Silver caption tables: each distinct caption's text vector, and the clip_score of every
(image, caption) pair, for the model_version the images were embedded with.

    silver/captions/model_version=<mv>/dt=<day>/      caption_id, caption, embedding, embedded_at
    silver/clip_scores/model_version=<mv>/dt=<day>/   media_id, caption_id, clip_score, scored_at

A caption is encoded once per model_version however many images carry it (caption_id is the sha256
of its text, layout.caption_id). Only captions of embedded images are planned; Ray Data encodes the
new ones (map_batches(CaptionUDF, compute=ActorPoolStrategy), the model's text tower in batches)
and the driver streams them into Parquet; up to DRIVER_ENCODE_CAPTIONS the driver encodes them
itself with the same CaptionUDF (an actor pool's start-up would cost more than the work).
clip_score is then the cosine of the *stored* image vector and the *stored* caption vector (both
L2-normalised: their dot product), read back from silver, never re-encoded. A rerun encodes only
captions not stored and scores only pairs not scored (`force`: all again; readers take the newest
row per key).

Both tables follow silver's commit protocol: the run holds silver/_work/<run_id>/ while it writes,
its files carry the run_id in their names, and one commit record per table
(<table>/model_version=<mv>/_commits/<run_id>.json), written after them, makes them data. Caption
vectors are committed before any score that reads them.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import cluster
from ..model import ModelSpec, check_available, choose_precision, load_model
from ..options import EmbedOptions
from ..progress import Progress
from ..store import catalog, debris, layout, silver, storage
from ..store.storage import Location

ACTOR_CPUS = 0.5  # the text tower is a tenth of the image tower's work: a fraction of a CPU per actor
# An actor pool costs seconds to start however few captions it gets (14 s for 24 captions on 2 CPUs,
# against 2 s here): up to this many new captions, the driver encodes them itself, in the same batches.
DRIVER_ENCODE_CAPTIONS = 4096


@dataclasses.dataclass
class CaptionReport:
    run_id: str
    model_version: str
    dt: str
    captions_planned: int = 0
    captions_embedded: int = 0  # captions encoded and committed
    pairs_scored: int = 0  # (media_id, caption_id) clip_scores committed
    actors: int = 0  # 0: encoded by the driver (DRIVER_ENCODE_CAPTIONS)
    batch_size: int = 0
    precision: str = ""
    encode_s: float = 0.0
    score_s: float = 0.0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CaptionUDF:
    """Loads the model once per actor; turns (caption_id, caption) batches into caption rows."""

    def __init__(self, spec: dict, precision: str, threads: int | None = None) -> None:
        self.model = load_model(ModelSpec.from_dict(spec), threads=threads, precision=precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.model.encode_texts(batch.column("caption").to_pylist())
        return silver.captions_table(batch.column("caption_id"), batch.column("caption"), vectors)


def plan(
    root: Location, model_version: str, force: bool = False, image_run: str | None = None
) -> tuple[pa.Table, pa.Table]:
    """(pairs to score: media_id, caption_id; captions to encode: caption_id, caption).

    The pairs are the manifest's distinct (media_id, caption) with a non-blank caption whose image
    is embedded for this model_version; captions stored and pairs scored already are left out, unless
    `force`. With force, the captions committed by the run `image_run` (the image run just before,
    whose actors encoded its images' captions with the same force) are left out all the same: force
    encodes each caption once."""
    manifest = catalog.read_manifest(root, ["media_id", "caption"])
    manifest = manifest.filter(
        pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(manifest["caption"]), ""), True))
    )
    embedded = catalog.read_silver(root, model_version, layout.EMBEDDINGS, ["media_id"])
    if embedded is None:
        manifest = manifest.slice(0, 0)
    else:
        manifest = manifest.filter(pc.is_in(manifest["media_id"], value_set=pc.unique(embedded["media_id"])))
    pairs = manifest.group_by(["media_id", "caption"]).aggregate([])
    ids = pa.array([layout.caption_id(c) for c in pairs["caption"].to_pylist()], pa.string())
    pairs = pairs.append_column("caption_id", ids)
    captions = pairs.group_by(["caption_id"], use_threads=False).aggregate([("caption", "first")])
    captions = pa.table({"caption_id": captions["caption_id"], "caption": captions["caption_first"]})
    pairs = pairs.select(["media_id", "caption_id"])
    if not force or image_run:
        stored = catalog.read_silver(root, model_version, layout.CAPTIONS, ["caption_id"], image_run if force else None)
        if stored is not None:
            captions = captions.filter(pc.invert(pc.is_in(captions["caption_id"], value_set=stored["caption_id"])))
    if not force:
        scored = catalog.read_silver(root, model_version, layout.CLIP_SCORES, ["media_id", "caption_id"])
        if scored is not None:
            pairs = pairs.join(scored, ["media_id", "caption_id"], join_type="left anti")
    return pairs.sort_by([("media_id", "ascending"), ("caption_id", "ascending")]), captions.sort_by("caption_id")


def score(root: Location, model_version: str, pairs: pa.Table) -> pa.Table:
    """clip_score of each pair: the dot product of its stored image and caption vectors (cosine)."""
    images = catalog.silver_latest(
        root, model_version, layout.EMBEDDINGS, ["media_id"], ["embedding"], "embedded_at", pc.unique(pairs["media_id"])
    )
    captions = catalog.silver_latest(
        root,
        model_version,
        layout.CAPTIONS,
        ["caption_id"],
        ["embedding"],
        "embedded_at",
        pc.unique(pairs["caption_id"]),
    )
    image_rows = pc.index_in(pairs["media_id"], value_set=images["media_id"]).to_numpy()
    caption_rows = pc.index_in(pairs["caption_id"], value_set=captions["caption_id"]).to_numpy()
    scores = np.einsum(
        "ij,ij->i", catalog.vector_matrix(images)[image_rows], catalog.vector_matrix(captions)[caption_rows]
    )
    now = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
    return pairs.append_column("clip_score", pa.array(scores, pa.float32())).append_column(
        "scored_at", pa.array([now.as_py()] * pairs.num_rows, now.type)
    )


def _write_run(root: Location, model_version: str, table: str, report: CaptionReport, tables) -> int:
    """The run's files of one caption table, then its commit record; the rows committed."""
    silver.write_files(root, model_version, table, report.dt, report.run_id, tables)
    record = silver.commit(root, model_version, table, report.dt, report.run_id, "captions")
    return record["rows"] if record else 0


def _encoded(captions: pa.Table, spec: ModelSpec, report: CaptionReport, actors: int, progress: Progress | None):
    """The captions' rows as Ray Data's actors encode them, in files' worth (the driver holds one file's)."""
    import ray

    cluster.start()  # a no-op after embed, which started or joined Ray
    blocks = max(1, min(captions.num_rows // report.batch_size, actors * 8))
    ds = (
        ray.data.from_arrow(captions)
        .repartition(blocks)
        .map_batches(
            CaptionUDF,
            batch_format="pyarrow",
            batch_size=report.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ACTOR_CPUS,
            fn_constructor_kwargs={"spec": spec.to_dict(), "precision": report.precision, "threads": 1},
        )
    )
    done = 0
    for rows in ds.iter_batches(batch_format="pyarrow", batch_size=silver.CAPTION_ROWS_PER_FILE):
        done += rows.num_rows
        if progress:
            progress(done, captions.num_rows)
        yield rows


def _encoded_here(captions: pa.Table, spec: ModelSpec, report: CaptionReport, progress: Progress | None):
    """A few captions' rows, encoded by the driver in batches of report.batch_size: one file's worth."""
    encode = CaptionUDF(spec.to_dict(), report.precision)
    batches = [
        encode(captions.slice(start, report.batch_size)) for start in range(0, captions.num_rows, report.batch_size)
    ]
    if progress:
        progress(captions.num_rows, captions.num_rows)
    yield pa.concat_tables(batches)


def embed_captions(
    root: Location | str,
    spec: ModelSpec,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    dt: str | None = EmbedOptions.dt,
    force: bool = EmbedOptions.force,
    precision: str = EmbedOptions.precision,
    *,
    image_run: str | None = None,
    progress: Progress | None = None,
) -> CaptionReport:
    """Encode the captions of embedded images that silver lacks, then score the new pairs; returns the run.

    `spec` is the model the images were embedded with, filed under its model_version (embed --save-as
    included). `actors` caption encoders (default 1). `image_run`: see plan. progress(done, total)
    counts captions encoded."""
    started = time.monotonic()
    root = storage.resolved(root)
    report = CaptionReport(layout.new_run_id(), spec.model_version, layout.check_day(dt or layout.today()))
    report.precision, report.batch_size = choose_precision(precision, "cpu"), batch_size
    pairs, captions = plan(root, spec.model_version, force, image_run)
    report.captions_planned = captions.num_rows
    if pairs.num_rows:
        check_available(spec)
        with storage.working(layout.silver_work_dir(root, report.run_id)):
            if captions.num_rows:
                report.actors = (actors or 1) if captions.num_rows > DRIVER_ENCODE_CAPTIONS else 0
                encoding = (
                    _encoded(captions, spec, report, report.actors, progress)
                    if report.actors
                    else _encoded_here(captions, spec, report, progress)
                )
                report.captions_embedded = _write_run(root, spec.model_version, layout.CAPTIONS, report, encoding)
            report.encode_s = round(time.monotonic() - started, 3)
            scored = [score(root, spec.model_version, pairs)]
            report.pairs_scored = _write_run(root, spec.model_version, layout.CLIP_SCORES, report, scored)
            report.score_s = round(time.monotonic() - started - report.encode_s, 3)
        debris.sweep(root, (debris.SILVER_WORK,))  # files and work folders of killed runs, as embed's commit does
    report.wall_s = round(time.monotonic() - started, 3)
    catalog.write_run_record(layout.caption_runs_dir(root), report)
    return report
