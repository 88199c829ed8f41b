"""Chains of stages: the demo, and eval through the whole pipeline, for the CLI and the Python API.

Also the wrapper every stage runs in (`stage`): the libraries' own output (Ray, img2dataset) goes to
a log file beside the run's record, and the caller's `Hooks` see progress, each stage's report and
other news as typed objects. Nothing here prints: the CLI's hooks draw what the user sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from .errors import UserError
from .options import DemoOptions, EmbedOptions, EvalOptions, IngestOptions, ModelOptions
from .progress import Progress
from .store import layout, storage
from .store.storage import Location

if TYPE_CHECKING:  # the stages import heavy libraries; the CLI imports this module for every command
    from .eval.recall import BenchmarkReport, EvalReport
    from .model import ModelSpec
    from .query.results import SearchResults
    from .query.searcher import Searcher
    from .stages.captions import CaptionReport
    from .stages.embed import EmbedReport
    from .stages.index import BuildReport
    from .stages.ingest import IngestReport

# The demo's images are served on a fixed port, so a rerun's URLs are the ones the manifest holds.
DEMO_PORT = 8731
DEMO_SAMPLE_QUERIES = 4


def _no_progress(label: str, terminal: TextIO) -> Progress | None:
    return None


def _ignore(event: object, terminal: TextIO) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """How a caller watches a run; the library calls these and never prints.

    progress(label, terminal): a stage's (done, total) callback, or None; one with a close()
    method is closed when its stage ends. report(event, terminal): each stage's report as it
    finishes (IngestReport, EmbedReport, BuildReport) and other news (DemoSite, RayDashboard).
    `terminal` is the stream the user sees: while a stage runs, fds 1 and 2 are in its log.
    """

    progress: Callable[[str, TextIO], Progress | None] = _no_progress
    report: Callable[[object, TextIO], None] = _ignore
    verbose: bool = False  # the libraries' own output on the terminal too (it is always in the log)
    terminal_fd: int = 1  # where the user looks: 2 when stdout carries a JSON document

    def terminal(self) -> TextIO:
        return sys.stdout if self.terminal_fd == 1 else sys.stderr


QUIET = Hooks()


class Stage:
    """One running stage as its caller sees it: progress and news on the terminal, and its log."""

    def __init__(self, hooks: Hooks, terminal: TextIO, log: Location | None) -> None:
        self.hooks, self.terminal, self.log = hooks, terminal, log
        self._progress: list[Progress] = []

    def progress(self, label: str) -> Progress | None:
        made = self.hooks.progress(label, self.terminal)
        if made is not None:
            self._progress.append(made)
        return made

    def report(self, event: object) -> None:
        self.hooks.report(event, self.terminal)

    def keep_log_as(self, run_id: str) -> None:
        """Name the log after the run, beside its JSON record (<runs>/<run_id>.log)."""
        if self.log is not None and storage.exists(self.log):
            storage.move(self.log, layout.run_log(self.log.parent, run_id))

    def _close(self) -> None:
        for made in self._progress:
            close = getattr(made, "close", None)
            if close is not None:
                close()  # e.g. the CLI's summary line, even when the count fell short (a failure)


@contextlib.contextmanager
def stage(runs_dir: Location | None, hooks: Hooks = QUIET) -> Iterator[Stage]:
    """Around a library call: with a runs_dir, the libraries' own output goes to a log file there
    (and, hooks.verbose, to the terminal too); progress goes to the hooks either way."""
    with contextlib.ExitStack() as stack:
        terminal, log = hooks.terminal(), None
        if runs_dir is not None:
            from .store import runlog

            log = layout.run_log(runs_dir, layout.new_run_id())  # renamed after the run by keep_log_as
            terminal = stack.enter_context(runlog.capture(log, hooks.verbose, terminal_fd=hooks.terminal_fd))
        running = Stage(hooks, terminal, log)
        try:
            yield running
        finally:
            running._close()


@dataclasses.dataclass(frozen=True)
class RayDashboard:
    """Ray was started or joined up front; its dashboard's URL (None: the cluster runs none)."""

    url: str | None


def start_ray(running: Stage, dashboard: bool = False) -> None:
    """Start or join Ray (with its dashboard, its logs on the terminal when verbose); the dashboard's
    URL goes to the hooks when one was asked for or an existing cluster was joined."""
    from . import cluster

    url = cluster.start(dashboard=dashboard, verbose=running.hooks.verbose)
    if dashboard or cluster.joins():
        running.report(RayDashboard(url))


Report = TypeVar("Report")


def run_stage(
    function: Callable[..., Report],
    *args,
    hooks: Hooks = QUIET,
    runs_dir: Location | None = None,
    progress: dict[str, str] | None = None,
    ray: bool = False,
    dashboard: bool = False,
    **kwargs,
) -> Report:
    """function(*args, **kwargs) as one stage, as `rayclip ingest|embed|index` run it: with runs_dir, the
    libraries' output goes to a log kept beside the run's record (<runs_dir>/<run_id>.log); `progress`
    names the function's progress keywords and their labels for hooks.progress; `ray`: the function
    takes a `start_ray` callable, which starts or joins Ray (start_ray) only once it has work; the
    report it returns goes to hooks.report once the stage is over."""
    with stage(runs_dir, hooks) as running:
        given = {key: running.progress(label) for key, label in (progress or {}).items()}
        if ray:
            given["start_ray"] = functools.partial(start_ray, running, dashboard)
        report = function(*args, **kwargs, **given)
    if runs_dir is not None:
        running.keep_log_as(report.run_id)
    hooks.report(report, hooks.terminal())
    return report


def embed_silver(
    root: Location,
    spec: ModelSpec,
    no_captions: bool = EmbedOptions.no_captions,
    *,
    hooks: Hooks = QUIET,
    dashboard: bool = False,
    **options,
) -> tuple[EmbedReport, CaptionReport | None]:
    """`rayclip embed`: the image embeddings (embed.embed with these options: unless `no_captions`,
    the same actors encode the new captions of the images they embed), then, unless `no_captions`,
    the caption stage (captions.embed_captions, same model_version, partition and actors): the
    captions left (of images embedded before) and the clip_scores of the embedded images. Each is a
    stage with its own run record and log (silver/runs/, silver/caption_runs/)."""
    from .stages import captions, embed

    embedded = run_stage(
        embed.embed, root, spec, hooks=hooks, runs_dir=layout.embed_runs_dir(root), progress={"progress": "embed"},
        ray=True, dashboard=dashboard, no_captions=no_captions, **options,
    )  # fmt: skip
    if no_captions:
        return embedded, None
    # The caption stage runs on CPUs: the precision asked for, resolved for a CPU (a GPU run's fp16
    # would not suit it), with the image run's actors, batch size and --force.
    shared = {name: options[name] for name in ("actors", "batch_size", "force", "precision") if name in options}
    captioned = run_stage(
        captions.embed_captions, root, embed.filed_as(spec, options.get("save_as")), dt=embedded.dt,
        hooks=hooks, runs_dir=layout.caption_runs_dir(root), progress={"progress": "captions"}, **shared,
    )  # fmt: skip
    return embedded, captioned


def embed_command(
    root: Location,
    spec: ModelSpec,
    no_captions: bool = EmbedOptions.no_captions,
    *,
    hooks: Hooks = QUIET,
    dashboard: bool = False,
    **options,
) -> tuple[EmbedReport, CaptionReport | None]:
    """`rayclip embed` as a whole command: embed_silver, then Ray shut down if this call started or
    joined it (the commits are written: nothing needs it), and the image run's record completed with
    what its own clock leaves out: startup_breakdown's before_run (this process's start until the
    run's clock started) and after_run (the run's clock stopped until now: captions, Ray's shut-down)."""
    from .stages import embed

    joined_before = _ray_connected()  # a caller's session (a test's, a notebook's) stays up
    embedded, captioned = embed_silver(root, spec, no_captions, hooks=hooks, dashboard=dashboard, **options)
    if not joined_before and _ray_connected():
        import ray

        ray.shutdown()
    process_started_at = _process_started_at()
    if process_started_at is not None:
        embedded.startup_breakdown["before_run"] = round(embedded.started_at - process_started_at, 3)
    embedded.startup_breakdown["after_run"] = round(time.time() - embedded.started_at - embedded.wall_s, 3)
    embed.save_record(root, embedded)
    return embedded, captioned


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported: never connected
    return ray is not None and ray.is_initialized()


def _process_started_at() -> float | None:
    """When this process started (wall clock), from Linux's /proc; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


# ------------------------------------------------------------------ eval through the pipeline


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
    from .eval import recall
    from .query.searcher import Searcher
    from .stages import index, ingest

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
    from .eval import recall
    from .query.searcher import Searcher
    from .stages import embed, index, ingest

    if not (annotations and images_dir):
        raise UserError("--dataset needs --annotations FILE and --images-dir DIR")
    root, annotations = storage.data_root(data_dir), Path(annotations)
    evaluated = recall.gallery(recall.read_annotations(dataset, annotations, Path(images_dir), split))
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


# ------------------------------------------------------------------ the demo


@dataclasses.dataclass(frozen=True)
class DemoSite:
    """The demo's generated images, served on loopback, and the LAION-style metadata naming them."""

    folder: Path
    images: int
    seed: int
    base_url: str
    metadata: Path


@dataclasses.dataclass
class DemoRun:
    root: Path
    site: DemoSite
    run: EvalRun
    samples: list[tuple[str, SearchResults]]  # a few of the captions, searched back


@contextlib.contextmanager
def serve_demo_site(site: Path) -> Iterator[str]:
    """The demo's images on DEMO_PORT; on a free port when that one is taken (a rerun then fetches again)."""
    from . import synthetic

    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(synthetic.serve_folder(site, port=DEMO_PORT))
        except OSError:
            base = stack.enter_context(synthetic.serve_folder(site))
        yield base


def run_demo(
    data_dir: str | os.PathLike | None = None,
    images: int = DemoOptions.images,
    seed: int = DemoOptions.seed,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    recall_at: tuple[int, ...] = EvalOptions.recall_at,
    hooks: Hooks = QUIET,
) -> DemoRun:
    """The whole pipeline offline: `images` synthetic captioned JPEGs (a seed training never used)
    served on loopback → img2dataset → Ray Data with the reference model → FAISS → Recall@K,
    then a few of the captions searched back. data_dir None: `demo` under the default data root."""
    from . import model, synthetic

    root = storage.data_root(data_dir) if data_dir else storage.data_root() / "demo"
    folder = root / "site"
    generated = synthetic.write_images(folder, images, seed=seed)
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    with serve_demo_site(folder) as base:
        site = DemoSite(folder, generated.num_rows, seed, base, root / "metadata.parquet")
        synthetic.write_metadata(generated, base, site.metadata)
        hooks.report(site, hooks.terminal())
        run = evaluate_metadata(root, site.metadata, spec, recall_at, actors, batch_size, hooks=hooks)
    # Captions spread over the generated set, so each query has at least one true match.
    captions = generated.column("caption").to_pylist()
    queries = captions[:: max(1, len(captions) // DEMO_SAMPLE_QUERIES)][:DEMO_SAMPLE_QUERIES]
    return DemoRun(root, site, run, [(query, run.searcher.search_text(query, k=3)) for query in queries])
