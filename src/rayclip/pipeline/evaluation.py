"""Eval through the whole pipeline: ingest → embed → index → Recall@K, for rayclip's metadata
benchmark and for clip_benchmark's datasets."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..options import EmbedOptions, EvalOptions, IngestOptions, ModelOptions
from ..store import layout, storage
from .embedding import embed_silver
from .runner import QUIET, Hooks, run_stage, stage, start_ray

if TYPE_CHECKING:
    from ..eval.recall import BenchmarkReport, EvalReport
    from ..model import ModelSpec
    from ..query.searcher import Searcher
    from ..stages.captions import CaptionReport
    from ..stages.embed import EmbedReport
    from ..stages.index import BuildReport
    from ..stages.ingest import IngestReport


@dataclasses.dataclass
class EvalRun:
    """Every stage's report of one ingest → embed → index → Recall@K run, and the Searcher it measured."""

    ingest: IngestReport
    embed: EmbedReport
    build: BuildReport
    eval: EvalReport  # saved as eval.json beside the build
    searcher: Searcher  # on the published build
    captions: CaptionReport | None = None  # the caption vectors and clip_scores embedded beside the images


def evaluate_metadata(
    data_dir: str | os.PathLike | None,
    metadata: str | os.PathLike,
    spec: ModelSpec,
    recall_at: tuple[int, ...] = EvalOptions.recall_at,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    url_col: str | None = IngestOptions.url_col,
    caption_col: str | None = IngestOptions.caption_col,
    precision: str = ModelOptions.precision,
    no_captions: bool = EmbedOptions.no_captions,
    hooks: Hooks = QUIET,
) -> EvalRun:
    """ingest → embed (images, then captions unless `no_captions`) → index → rayclip's metadata
    Recall@K over the images `metadata` names (data_dir as `--data-dir`: None is $RAYCLIP_DATA_DIR, else ./data)."""
    from ..eval import recall
    from ..query.searcher import Searcher
    from ..stages import index, ingest

    root, metadata = storage.data_root(data_dir), Path(metadata)
    urls = ingest.read_metadata(metadata, url_col, caption_col).column("url").to_pylist()
    downloads = {"progress": "ingest download", "store_progress": "ingest store"}
    ingested = run_stage(
        ingest.ingest_metadata,
        root,
        metadata,
        url_col=url_col,
        caption_col=caption_col,
        hooks=hooks,
        runs_dir=layout.ingest_runs_dir(root),
        progress=downloads,
    )
    embedded, captioned = embed_silver(
        root, spec, no_captions, hooks=hooks, actors=actors, batch_size=batch_size, precision=precision
    )
    built = run_stage(index.build, root, spec.model_version, hooks=hooks, progress={"progress": "index"})
    searcher = Searcher.load(root, spec.model_version, precision=precision)
    with stage(None, hooks) as running:
        measured = recall.evaluate(searcher, urls, tuple(recall_at), progress=running.progress("eval"))
    return EvalRun(ingested, embedded, built, recall.save(root, measured), searcher, captioned)


def evaluate_benchmark(
    data_dir: str | os.PathLike | None,
    dataset: str,
    annotations: str | os.PathLike,
    images_dir: str | os.PathLike,
    spec: ModelSpec,
    split: str | None = EvalOptions.split,
    recall_at: tuple[int, ...] = EvalOptions.recall_at,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    precision: str = ModelOptions.precision,
    hooks: Hooks = QUIET,
) -> BenchmarkReport:
    """Folder ingest of the annotated images → embed → index → clip_benchmark's Recall@K, in one
    stage whose log is kept beside the embed run; eval.json and eval.html go next to the build.
    Each stage's report goes to hooks.report. Returns the BenchmarkReport."""
    from ..eval import recall
    from ..eval.annotations import read_annotations
    from ..query.searcher import Searcher
    from ..stages import embed, index, ingest

    if not (annotations and images_dir):
        raise UserError("--dataset needs --annotations FILE and --images-dir DIR")
    root, annotations = storage.data_root(data_dir), Path(annotations)
    evaluated = recall.gallery(read_annotations(dataset, annotations, Path(images_dir), split))
    with stage(layout.embed_runs_dir(root), hooks) as running:
        start_ray(running)
        with recall.staged_links(evaluated) as folder:
            ingested = ingest.ingest_folder(root, folder)
        embedded = embed.embed(root, spec, actors=actors, batch_size=batch_size, precision=precision)
        built = index.build(root, spec.model_version)
        searcher = Searcher.load(root, spec.model_version, precision=precision)
        report = recall.save_benchmark(
            root, recall.score_benchmark(searcher, evaluated, tuple(recall_at)), dataset, annotations, split
        )
    running.keep_log_as(embedded.run_id)  # the libraries' output, beside the embed run
    for finished in (ingested, embedded, built):  # passed on once the stage is over: stdout is its log till then
        hooks.report(finished, hooks.terminal())
    return report
