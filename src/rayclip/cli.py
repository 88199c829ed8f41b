"""`rayclip` command line: one subcommand per stage.

Heavy libraries (torch, ray, faiss) are imported inside the commands that use them,
so `rayclip --help` answers at once. This is the only module that prints.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from .errors import UserError
from .store import layout, storage

# With --json, stdout carries the one JSON document and everything meant for people goes to stderr.
_OUTPUT = {"json": False}


def _console():
    return _console_on(stderr=_OUTPUT["json"])


@functools.cache
def _console_on(stderr: bool):
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, stderr=stderr)  # no hard wraps in plain lines (paths, URLs)


def _print_json(document) -> None:
    print(json.dumps(document, indent=2, default=str))


# ------------------------------------------------------------------ progress and the libraries' logs


class _Progress:
    """One stage's (done, total) callback drawn as a rich bar on a terminal; elsewhere (a pipe,
    a job log) as one line when it starts and one when it ends."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream = label, stream
        self.started = time.monotonic()
        self.done = self.total = -1
        self.finished = False
        self.lock = threading.Lock()
        self.bar = None
        if stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description:<18}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=stream),
                # The libraries' own prints stay in the run's log, not above the bar.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.task = self.bar.add_task(label, total=None, rate="")

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if self.total < 0:
                self.started = time.monotonic()
                if self.bar is None:
                    print(f"{self.label}: {total} to do", file=self.stream, flush=True)
                else:
                    self.bar.start()
            self.done, self.total = done, total
            if self.bar is not None:
                self.bar.update(self.task, completed=done, total=total, rate=f"{self._rate():.1f}/s")
            if done >= total:
                self._finish()

    def _rate(self) -> float:
        return max(self.done, 0) / max(time.monotonic() - self.started, 1e-6)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.bar is not None:
            self.bar.stop()
            return
        seconds = time.monotonic() - self.started
        print(f"{self.label}: {self.done}/{self.total} in {seconds:.1f} s ({self._rate():.1f}/s)", file=self.stream)

    def close(self) -> None:
        """At the end of the stage: the summary line even when the count fell short (a failure)."""
        with self.lock:
            if self.total >= 0:
                self._finish()


def _progress_bar(label: str, terminal: TextIO) -> _Progress | None:
    return None if _OUTPUT["json"] else _Progress(label, terminal)  # with --json stdout is for the document


def _hooks(verbose: bool = False, stage_reports: bool = True):
    """What a library run shows here: progress bars, each stage's summary (unless stage_reports is
    off), the demo's site and Ray's dashboard; with --json all of it on stderr."""
    from . import pipeline

    return pipeline.Hooks(
        progress=_progress_bar,
        report=functools.partial(_show_event, stage_reports=stage_reports),
        verbose=verbose,
        terminal_fd=2 if _OUTPUT["json"] else 1,
    )


def _show_event(event, terminal: TextIO, stage_reports: bool = True) -> None:
    from . import pipeline
    from .stages import embed, index, ingest

    if isinstance(event, pipeline.RayDashboard):
        print(f"Ray dashboard: {event.url or 'not running on this cluster'}", file=terminal, flush=True)
    elif isinstance(event, pipeline.DemoSite):
        console = _console()
        held_out = f"seed {event.seed}, not used in training"
        console.print(f"generated {event.images} captioned JPEGs in {_shown(event.folder)} ({held_out})")
        console.print(f"serving them at {event.base_url}; metadata in LAION format (URL, TEXT)")
    elif stage_reports:
        show = {ingest.IngestReport: _show_ingest, embed.EmbedReport: _show_embed, index.BuildReport: _show_index}
        show[type(event)](event)


def _table(title: str, columns: list[str], rows: list[list], **kwargs):
    from rich.table import Table

    table = Table(title=title, title_justify="left", **kwargs)
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    return table


def _print_kv(title: str, items: dict) -> None:
    _console().print(_table(title, ["", ""], [[k, v] for k, v in items.items()], show_header=False))


# ------------------------------------------------------------------ ingest


def cmd_ingest(args: argparse.Namespace) -> int:
    from . import pipeline
    from .stages import ingest

    root = storage.data_root(args.data_dir)
    with pipeline.stage(layout.ingest_runs_dir(root), _hooks(args.verbose)) as stage:
        if args.folder:
            report = ingest.ingest_folder(
                root, args.folder, limit=args.limit, store_progress=stage.progress("ingest store")
            )
        else:
            report = ingest.ingest_metadata(
                root,
                args.metadata,
                url_col=args.url_col,
                caption_col=args.caption_col,
                limit=args.limit,
                processes=args.processes,
                threads=args.threads,
                timeout=args.timeout,
                retries=args.retries,
                refetch=args.refetch,
                distributor=args.distributor,
                progress=stage.progress("ingest download"),
                store_progress=stage.progress("ingest store"),
            )
    stage.keep_log_as(report.run_id)
    if args.json:
        _print_json(report.to_dict())
    else:
        _show_ingest(report)
    # Exit 0 if anything usable came through (stored now, already stored before, or already known).
    return 0 if report.downloaded or report.skipped_known_urls or not report.rows_read else 1


def _show_run(title: str, summary: dict) -> None:
    """A run's summary, then its failures by reason (ingest and embed report the same way)."""
    failed = summary.pop("failed")
    _print_kv(title, summary)
    if failed:
        _console().print(_table("failed, by reason", ["reason", "count"], [[k, v] for k, v in failed.items()]))


def _show_ingest(report) -> None:
    _show_run(f"ingest {report.run_id}", report.to_dict())


# ------------------------------------------------------------------ embed


def _spec(args: argparse.Namespace):
    import dataclasses

    from . import model

    spec = model.resolve(args.model, args.pretrained)
    if getattr(args, "model_version", None):
        spec = dataclasses.replace(spec, version=layout.slug(args.model_version))
    if spec.pretrained == model.RANDOM_INIT:
        print(
            f"warning: {spec.name} with random weights (--pretrained none): for plumbing and speed only",
            file=sys.stderr,
        )
    return spec


def cmd_embed(args: argparse.Namespace) -> int:
    from . import pipeline
    from .stages import embed

    root = storage.data_root(args.data_dir)
    spec = _spec(args)
    console = _console()
    console.print(f"embedding with {spec.name} ({spec.pretrained}) as model_version={spec.model_version}")
    with pipeline.stage(layout.embed_runs_dir(root), _hooks(args.verbose)) as stage:
        pipeline.start_ray(stage, args.dashboard)
        report = embed.embed(
            root,
            spec,
            actors=args.actors,
            batch_size=args.batch_size,
            limit=args.limit,
            day=args.dt,
            blocks=args.blocks,
            force=args.force,
            gpus_per_actor=args.gpus_per_actor,
            precision=args.precision,
            progress=stage.progress("embed"),
        )
    stage.keep_log_as(report.run_id)
    if args.json:
        _print_json(report.to_dict())
        return 0 if report.rows_embedded or not report.rows_planned else 1
    _show_embed(report)
    return 0 if report.rows_embedded or not report.rows_planned else 1


def _show_embed(report) -> None:
    console = _console()
    if report.rows_planned == 0:
        console.print(f"nothing new to embed: every media_id in the manifest is in silver for {report.model_version}")
        return
    summary = report.to_dict()
    console.print(_optimized_physical_plan(summary.pop("plan")), markup=False)
    summary.pop("failed_ids")  # in the run's JSON
    _show_run(f"embed {report.run_id}", summary)


def _optimized_physical_plan(explained: str) -> str:
    """The last of the plans ds.explain() prints (logical, optimized, physical, optimized physical)."""
    marker = "-------- Physical Plan (Optimized) --------"
    return marker + explained.split(marker, 1)[1] if marker in explained else explained


# ------------------------------------------------------------------ index


def cmd_index(args: argparse.Namespace) -> int:
    from . import pipeline
    from .stages import index

    root = storage.data_root(args.data_dir)
    if args.rollback:
        old, new = index.rollback(root, args.model_version)
        if args.json:
            _print_json({"model_version": args.model_version, "current": new, "previous": old})
            return 0
        _console().print(f"CURRENT now {new} (was {old})")
        return 0
    with pipeline.stage(None, _hooks()) as stage:
        report = index.build(
            root,
            args.model_version,
            args.dt,
            args.index_type,
            max_index_memory=args.max_index_memory,
            target_recall=args.target_recall,
            retrain=args.retrain,
            progress=stage.progress("index"),
        )
    if args.json:
        _print_json(vars(report))
    else:
        _show_index(report)
    return 0


def _show_index(report) -> None:
    shown = {k: v for k, v in vars(report).items() if k != "build_id"} | {"path": _shown(report.path)}
    _print_kv(f"published build {report.build_id}", shown)
    if not report.recall_target_met:
        print(
            f"warning: recall@10 {report.recall_at_10:.3f} is below the target; "
            "allow more memory (--max-index-memory) or pick another --index-type",
            file=sys.stderr,
        )


# ------------------------------------------------------------------ search


def _print_results(results, as_json: bool, title: str) -> None:
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    rows = [[r.rank, f"{r.score:.4f}", r.caption or "", r.path or r.url or ""] for r in results]
    columns = ["rank", "cosine", "caption", "path"]
    if any(r.duplicates for r in results):  # collapse folded some: say how many per result
        rows, columns = [row + [r.duplicates or ""] for row, r in zip(rows, results)], columns + ["+near-dups"]
    _console().print(_table(title, columns, rows))


def cmd_search(args: argparse.Namespace) -> int:
    from .query.searcher import Searcher

    terms = _query_terms(args)
    searcher = Searcher.open(args.data_dir, args.model_version, precision=args.precision)
    results = searcher.search(terms, args.k, where=args.where, collapse=_collapse_threshold(args.collapse))
    title = " ".join(_term_title(term) for term in terms).lstrip("+ ")
    if args.where:
        title += f" where {args.where}"
    _print_results(results, args.json, f"{title} — {searcher.model_version}, build {searcher.info['build_id']}")
    return 0


# (flag, term kind, sign): the parts of a combined query, rclip-style
_TERM_FLAGS = [
    ("q", "text", 1.0),
    ("image", "image", 1.0),
    ("add", "text", 1.0),
    ("subtract", "text", -1.0),
    ("add_image", "image", 1.0),
    ("subtract_image", "image", -1.0),
    ("like", "media_id", 1.0),
]


def _query_terms(args: argparse.Namespace) -> list:
    from .query.searcher import Term

    terms = [Term.parse(kind, value, sign) for flag, kind, sign in _TERM_FLAGS for value in getattr(args, flag) or []]
    if not any(term.weight > 0 for term in terms):
        raise UserError("give something to search for: --q TEXT, --image FILE or --like MEDIA_ID")
    return terms


def _term_title(term) -> str:
    shown = {"text": repr(term.value), "image": f"image {term.value}", "media_id": f"like {str(term.value)[:12]}"}
    weight = abs(term.weight)
    return f"{'+' if term.weight > 0 else '-'} {'' if weight == 1 else f'{weight:g}×'}{shown[term.kind]}"


def _cosine_or_default(text: str) -> float | str:
    return text if text == "default" else float(text)


def _collapse_threshold(asked: float | str | None) -> float | None:
    """--collapse alone means the library's default threshold; with a number, that cosine."""
    from .query.searcher import DEFAULT_COLLAPSE

    return DEFAULT_COLLAPSE if asked == "default" else asked


# ------------------------------------------------------------------ eval


def _show_eval(report) -> None:
    rows = [
        [
            f"R@{k}",
            f"{report.text_to_image[k]:.3f}",
            f"{report.image_to_text[k]:.3f}",
            f"{report.chance_text_to_image[k]:.3f}",
        ]
        for k in report.text_to_image
    ]
    title = (
        f"recall (rayclip's metadata definition), {report.model_version} "
        f"({report.images} images, {report.queries} distinct captions)"
    )
    _console().print(_table(title, ["", "text→image", "image→text", "chance (text→image)"], rows))
    _console().print(f"saved {_shown(report.path)}", markup=False)


def _show_benchmark(report) -> None:
    rows = [
        [
            f"R@{k}",
            f"{report.text_to_image[k]:.3f}",
            f"{report.chance_text_to_image[k]:.3f}",
            f"{report.image_to_text[k]:.3f}",
            f"{report.chance_image_to_text[k]:.3f}",
        ]
        for k in report.text_to_image
    ]
    split = f" {report.split} split" if report.split else ""
    title = (
        f"{report.dataset}{split}, clip_benchmark's recall: {report.model_version} "
        f"({report.images} images, {report.captions} captions)"
    )
    _console().print(_table(title, ["", "text→image", "chance", "image→text", "chance"], rows))
    _console().print(f"saved {_shown(report.path)}\nreport {_shown(report.html)}", markup=False)


def _eval_benchmark(args: argparse.Namespace) -> int:
    from . import pipeline

    if not (args.annotations and args.images):
        raise UserError("--dataset needs --annotations FILE and --images DIR")
    report = pipeline.evaluate_benchmark(
        args.data_dir,
        args.dataset,
        args.annotations,
        args.images,
        _spec(args),
        split=args.split,
        ks=tuple(args.k),
        actors=args.actors,
        batch_size=args.batch_size,
        precision=args.precision,
        hooks=_hooks(args.verbose, stage_reports=not args.json),
    )
    if args.json:
        _print_json(report.to_dict())
    else:
        _show_benchmark(report)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import pipeline

    if args.dataset:
        return _eval_benchmark(args)
    run = pipeline.evaluate_metadata(
        args.data_dir,
        args.metadata,
        _spec(args),
        tuple(args.k),
        args.actors,
        args.batch_size,
        url_col=args.url_col,
        caption_col=args.caption_col,
        precision=args.precision,
        hooks=_hooks(args.verbose),
    )
    if args.json:
        _print_json(run.eval.to_dict())
        return 0
    _show_eval(run.eval)
    return 0


# ------------------------------------------------------------------ demo


def _shown(path: Path | str) -> str:
    """A path as the user can type it: relative to the working directory when under it."""
    try:
        return str(Path(str(path)).relative_to(Path.cwd()))  # str: an s3:// location is not a path
    except ValueError:  # elsewhere
        return str(path)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import pipeline

    console = _console()
    console.rule("rayclip demo: synthetic captioned images → img2dataset → Ray Data → FAISS → search")
    demo = pipeline.run_demo(
        args.data_dir, args.images, args.seed, args.actors, args.batch_size, tuple(args.k), hooks=_hooks(args.verbose)
    )
    for query, results in demo.samples:
        _print_results(results, False, f"{query!r}")
    _show_eval(demo.run.eval)
    console.print(
        "\nNext: the same pipeline on real data and a cluster\n"
        "  rayclip ingest --metadata laion_part.parquet --processes 8 --threads 64\n"
        "  rayclip embed --model ViT-B-32 --pretrained openai --actors 8 --batch-size 64\n"
        "  rayclip index && rayclip search --q 'a dog running on grass' --k 10 && rayclip serve\n"
        "  On a Ray cluster: RAY_ADDRESS=head:6379 rayclip embed --data-dir s3://bucket/rayclip …\n"
        "    (or: ray job submit --working-dir . -- rayclip embed …)\n"
        f"  Explore this demo: rayclip search --data-dir {_shown(demo.root)} --q 'a small green square'\n"
        f"                     rayclip serve --data-dir {_shown(demo.root)}",
        markup=False,
    )
    return 0


# ------------------------------------------------------------------ train-reference


def cmd_train_reference(args: argparse.Namespace) -> int:
    from . import model
    from .train import train_reference

    out = Path(args.out) if args.out else model.REFERENCE_WEIGHTS
    console = _console()
    console.print(f"training {model.REFERENCE_MODEL} for {args.steps} steps (seed {args.seed}) on CPU → {out}")
    summary = train_reference(
        out,
        seed=args.seed,
        steps=args.steps,
        progress=lambda step, loss: console.print(f"step {step:4d}  loss {loss:.3f}"),
    )
    _print_kv("trained", summary)
    return 0


# ------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .http.app import API_KEY_ENV, check_bind, create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key, args.allow_anonymous)
    app = create_app(
        args.data_dir,
        args.model_version,
        max_upload_bytes=args.max_upload_mb << 20,
        cors_origins=args.cors_origin,
        allow_url_queries=args.allow_url_queries,
        serve_images=args.serve_images,
        precision=args.precision,
        api_key=api_key,
        queue_depth=args.queue_depth,
    )
    where = f"http://{args.host}:{args.port}/"
    # A plain print: rich would wrap the address at 80 columns when stdout is not a terminal.
    served = _shown(storage.data_root(args.data_dir))
    print(f"rayclip serving {served} on {where} (API docs at {where}docs)", flush=True)
    guard = "API key required on /api/* and /metrics" if api_key else "no API key"
    print(f"status page {where}status · metrics {where}metrics · {guard}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


# ------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    from .store.status import status

    info = status(storage.data_root(args.data_dir))
    if args.json:
        _print_json(info)
        return 0
    console = _console()
    console.print(f"data dir: {info['data_dir']}")
    _print_kv("bronze", info["bronze"])
    silver = info["silver"]
    console.print(
        _table("silver embeddings", ["model_version", "dt", "files", "rows"], [list(p.values()) for p in silver])
        if silver
        else "silver: no embeddings yet (run `rayclip embed`)"
    )
    gold = info["gold"]
    rows = [
        [
            b["model_version"],
            b["build_id"],
            b["count"],
            b["index_type"] or "",
            _bytes(b["index_bytes"]),
            "" if b.get("recall_at_10") is None else f"{b['recall_at_10']:.3f}",
            f"{next(iter(b['eval']['text_to_image'].values())):.3f}" if b["eval"] else "",
            b["created_at"],
            "CURRENT" if b["current"] else "",
        ]
        for b in gold
    ]
    columns = ["model_version", "build_id", "count", "index", "size", "recall@10", "R@1 t→i", "created", ""]
    console.print(_table("gold builds", columns, rows) if gold else "gold: no index yet (run `rayclip index`)")
    _show_debris(info["debris"])
    return 0


def _show_debris(found: list[dict]) -> None:
    if not found:
        return
    rows = [[d["path"], d["bytes"]] for d in found]
    title = "debris of killed runs (no reader sees it; `rayclip gc` removes it)"
    _console().print(_table(title, ["path", "bytes"], rows))


# ------------------------------------------------------------------ gc


def cmd_gc(args: argparse.Namespace) -> int:
    from .store import debris

    root = storage.data_root(args.data_dir)
    removed = debris.sweep(root)
    if args.json:
        _print_json({"data_dir": str(root), "removed": [str(path.relative_to(root)) for path in removed]})
        return 0
    for path in removed:
        print(f"removed {path.relative_to(root)}")
    _console().print(f"gc: {len(removed)} leftovers of killed runs removed from {_shown(root)}", markup=False)
    return 0


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# ------------------------------------------------------------------ parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayclip",
        description="Multimodal embedding and retrieval: img2dataset ingest, CLIP on Ray Data, FAISS search.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        default=None,
        help=f"data root (default: ${storage.DATA_DIR_ENV}, else ./data)",
    )
    common.add_argument(
        "--verbose", action="store_true", help="show Ray's and img2dataset's own logs too (always in the run's log)"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document (the run record) on stdout")

    p = sub.add_parser(
        "ingest", parents=[common, as_json], help="download metadata URLs (img2dataset) or copy a folder into bronze"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--metadata", help="LAION-style metadata: .parquet, .csv, .tsv or .jsonl (a path or a URL)")
    source.add_argument("--folder", help="a folder of images (recursive; path or URL); captions from name.txt sidecars")
    p.add_argument("--url-col", default=None, help="URL column (default: URL, else url)")
    p.add_argument("--caption-col", default=None, help="caption column (default: TEXT, else caption/text)")
    p.add_argument("--limit", type=_positive_int, default=None, help="read at most N rows")
    p.add_argument("--processes", type=_positive_int, default=1, help="img2dataset processes")
    p.add_argument("--threads", type=_positive_int, default=16, help="img2dataset threads per process")
    p.add_argument("--timeout", type=_positive_int, default=10, help="seconds per download")
    p.add_argument("--retries", type=int, default=0, help="retries per URL")
    p.add_argument("--refetch", action="store_true", help="fetch URLs the manifest already holds again (re-check)")
    p.add_argument(
        "--distributor",
        choices=("multiprocessing", "ray"),
        default="multiprocessing",
        help="img2dataset's distributor: multiprocessing (--processes here) or ray (a task per shard on the "
        "cluster ray.init() joins: $RAY_ADDRESS, else a local one)",
    )
    p.set_defaults(func=cmd_ingest)

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", default=None, help="open_clip model name or hf-hub: id (default: ViT-B-32)")
    model_args.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag (default: openai), a checkpoint path, `none` (random init) or `reference`",
    )

    p = sub.add_parser("embed", parents=[common, model_args, as_json], help="CLIP embeddings with Ray Data into silver")
    p.add_argument(
        "--actors",
        type=_positive_int,
        default=None,
        help="actors in the pool, one model each (default: one per GPU asked for, else one per two CPUs)",
    )
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=32)
    p.add_argument("--limit", type=_positive_int, default=None, help="embed at most N new media_ids")
    p.add_argument("--dt", default=None, help="partition date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--blocks", type=_positive_int, default=None, help="override_num_blocks (default: actors x 8)")
    p.add_argument("--force", action="store_true", help="re-embed media_ids already in silver")
    p.add_argument("--model-version", default=None, help="file the embeddings under this name instead")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor on a cluster (0: CPU)")
    _precision_arg(p, "the model's compute precision; vectors are stored as float32 either way")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too; print its URL")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", parents=[common, as_json], help="build and publish a FAISS index from silver (gold)")
    p.add_argument("--model-version", default=None, help="which embeddings (default: the only one present)")
    p.add_argument("--dt", default=None, help="only this silver partition (default: all)")
    p.add_argument(
        "--index-type",
        default="auto",
        help="auto (flat below 100k vectors, then HNSW, IVF-HNSW-PQ, OPQ+IVF-PQ), flat, or a FAISS factory string",
    )
    p.add_argument("--max-index-memory", default="4G", help="memory budget auto picks the index for (default: 4G)")
    p.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 vs exact search the build tunes for (0.95)"
    )
    p.add_argument("--retrain", action="store_true", help="full build: do not extend the CURRENT index")
    p.add_argument("--rollback", action="store_true", help="point CURRENT back at the previous build")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", parents=[common, as_json], help="text→image or image→image search")
    weighted = "; repeatable, optional weight as in 2:TEXT"
    p.add_argument("--q", "--query", dest="q", action="append", help="text query" + weighted)
    p.add_argument("--image", action="append", help="image file: find similar images" + weighted)
    p.add_argument("--add", action="append", metavar="TEXT", help="add a text to the query" + weighted)
    p.add_argument("--subtract", action="append", metavar="TEXT", help="subtract a text" + weighted)
    p.add_argument("--add-image", action="append", metavar="FILE", help="add an image" + weighted)
    p.add_argument("--subtract-image", action="append", metavar="FILE", help="subtract an image" + weighted)
    p.add_argument("--like", action="append", metavar="MEDIA_ID", help="add an indexed image's stored vector")
    p.add_argument("--where", default=None, help="filter, e.g. \"width >= 512 AND caption LIKE '%%dog%%'\"")
    p.add_argument("--k", type=int, default=10, help="results to return")
    p.add_argument("--model-version", default=None, help="which index (default: the only one present)")
    p.add_argument(
        "--collapse",
        nargs="?",
        type=_cosine_or_default,
        const="default",  # argparse passes const through `type` too
        default=None,
        metavar="COSINE",
        help="fold near-duplicates (cosine >= COSINE, default 0.96) into the result above them",
    )
    _precision_arg(p, "the query encoder's precision")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "eval",
        parents=[common, model_args, as_json],
        help="Recall@K through the whole pipeline: a benchmark or metadata",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", choices=["karpathy", "coco"], help="a retrieval benchmark's annotations (clip_benchmark's recall)"
    )
    source.add_argument("--metadata", help="captioned LAION-style metadata (URL, TEXT), rayclip's own recall")
    p.add_argument("--annotations", help="Karpathy split JSON (dataset_flickr30k.json) or COCO captions JSON")
    p.add_argument("--images", help="the folder the annotation file's image names are under")
    p.add_argument("--split", default=None, help="Karpathy split to evaluate (default: test)")
    p.add_argument("--url-col", default=None)
    p.add_argument("--caption-col", default=None)
    p.add_argument("--k", type=_positive_int, nargs="+", default=[1, 5, 10], help="cut-offs (default: 1 5 10)")
    p.add_argument("--actors", type=_positive_int, default=2)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=32)
    _precision_arg(p, "embed and query precision")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", parents=[common], help="the whole pipeline, offline, on generated data (make demo)")
    p.add_argument("--images", type=_positive_int, default=500, help="synthetic images to generate")
    p.add_argument("--seed", type=int, default=1234, help="generator seed (training uses 0)")
    p.add_argument("--actors", type=_positive_int, default=2)
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=32)
    p.add_argument("--k", type=_positive_int, nargs="+", default=[1, 5, 10])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train-reference", help="retrain the shipped offline reference model (about 9 minutes on 2 cores)"
    )
    p.add_argument("--out", default=None, help="where to write the weights (default: the packaged file)")
    p.add_argument("--steps", type=_positive_int, default=700)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_reference)

    p = sub.add_parser("serve", parents=[common], help="HTTP search service and web page")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-version", default=None)
    p.add_argument("--max-upload-mb", type=_positive_int, default=10, help="largest image upload accepted")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="an origin allowed to call the API from a browser, e.g. a clip-retrieval front (repeatable; `*` for any)",
    )
    p.add_argument(
        "--allow-url-queries", action="store_true", help="let /knn-service fetch image_url (public http(s) only)"
    )
    p.add_argument("--serve-images", action="store_true", help="/knn-service urls point at our stored copies")
    _precision_arg(p, "the query encoder's precision")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /api/* (or $RAYCLIP_API_KEY)")
    p.add_argument("--allow-anonymous", action="store_true", help="serve a non-loopback address without an API key")
    p.add_argument(
        "--queue-depth", type=_positive_int, default=8, help="queries encoding at once; more get 503 + Retry-After"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", parents=[common, as_json], help="counts per layer: bronze, silver, gold")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "gc", parents=[common, as_json], help="remove what killed runs left behind (work folders, temp files)"
    )
    p.set_defaults(func=cmd_gc)
    return parser


def _precision_arg(parser: argparse.ArgumentParser, what: str) -> None:
    from .model import PRECISIONS

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help=f"{what} (default auto: bf16 where the CPU has AMX or AVX-512 BF16 or the GPU runs it, else fp32)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _OUTPUT["json"] = getattr(args, "json", False)
    try:
        return args.func(args)
    except UserError as err:
        print(f"rayclip {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"rayclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
