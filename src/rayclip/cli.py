"""`rayclip` command line: one subcommand per stage, its flags generated from rayclip.stages.options. The only
module that prints; heavy libraries (torch, ray, faiss) are imported by the commands that use them (--help is instant).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from . import options, pipeline
from .errors import UnknownModelVersionError, UserError
from .store import layout, storage

_OUTPUT: dict = {"json": False, "console": None}  # with --json, stdout carries the JSON document, the rest stderr


def _console():
    from rich.console import Console

    if _OUTPUT["console"] is None:  # soft_wrap: no hard wraps in plain lines (paths, URLs)
        _OUTPUT["console"] = Console(highlight=False, soft_wrap=True, stderr=_OUTPUT["json"])
    return _OUTPUT["console"]


def _emit(args: argparse.Namespace, document, show=None, *shown) -> None:
    """The JSON document on stdout with --json, else what show(*shown) draws for people."""
    if args.json:
        print(json.dumps(document, indent=2, default=str))
    elif show is not None:
        show(*shown)


def _table(title: str, rows: list[list] | dict, columns: list[str] | None = None, empty: str | None = None) -> None:
    """rows under the columns, a dict's key, value pairs without a header; no rows and `empty`: that line instead."""
    from rich.table import Table

    if not rows and empty is not None:
        return _console().print(empty) if empty else None
    table = Table(title=title, title_justify="left", show_header=columns is not None)
    for name in columns or ["", ""]:
        table.add_column(name)
    for row in rows.items() if isinstance(rows, dict) else rows:
        table.add_row(*[str(v) for v in row])
    _console().print(table)


def _shown(path: Path | str) -> str:
    """A path as the user can type it: relative to the working directory when under it."""
    try:
        return str(Path(str(path)).relative_to(Path.cwd()))  # str: an s3:// location is not a path
    except ValueError:  # elsewhere
        return str(path)


class _Progress:
    """One stage's (done, total) callback drawn as a rich bar on a terminal; elsewhere (a pipe, a job
    log) as one line when it starts and one when it ends, or when the stage closes it short (a failure)."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream, self.started, self.done, self.total = label, stream, time.monotonic(), -1, -1
        self.finished, self.lock, self.bar = False, threading.RLock(), None
        if stream.isatty():
            from rich import progress as rp
            from rich.console import Console

            columns = [rp.TextColumn("{task.description:<18}"), rp.BarColumn(), rp.MofNCompleteColumn()]
            columns += [rp.TextColumn("{task.fields[rate]}"), rp.TimeElapsedColumn(), rp.TextColumn("eta")]
            columns += [rp.TimeRemainingColumn()]  # the libraries' own prints stay in the run's log, not above the bar
            self.bar = rp.Progress(*columns, console=Console(file=stream), redirect_stdout=False, redirect_stderr=False)
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
                self.close()

    def _rate(self) -> float:
        return max(self.done, 0) / max(time.monotonic() - self.started, 1e-6)

    def close(self) -> None:
        with self.lock:
            if self.finished or self.total < 0:
                return
            self.finished = True
            if self.bar is not None:
                return self.bar.stop()
            seconds = time.monotonic() - self.started
            print(f"{self.label}: {self.done}/{self.total} in {seconds:.1f} s ({self._rate():.1f}/s)", file=self.stream)


def _hooks(verbose: bool = False, stage_reports: bool = True) -> pipeline.Hooks:
    """What a library run shows here: progress bars (none with --json: stdout is for the document),
    each stage's summary (unless stage_reports is off), the demo's site and Ray's dashboard."""
    as_json, report = _OUTPUT["json"], functools.partial(_show_event, stage_reports=stage_reports)
    bars = (lambda label, terminal: None) if as_json else _Progress
    return pipeline.Hooks(bars, report, verbose, terminal_fd=2 if as_json else 1)


def _show_event(event, terminal: TextIO, stage_reports: bool = True) -> None:
    if isinstance(event, pipeline.RayDashboard):
        print(f"Ray dashboard: {event.url or 'not running on this cluster'}", file=terminal, flush=True)
    elif isinstance(event, pipeline.DemoSite):
        held_out = f"seed {event.seed}, not used in training"
        _console().print(f"generated {event.images} captioned JPEGs in {_shown(event.folder)} ({held_out})")
        _console().print(f"serving them at {event.base_url}; metadata in LAION format (URL, TEXT)")
    elif stage_reports:  # a stage's report
        embed = functools.partial(_show_run, stage="embed")
        export = functools.partial(_show_run, stage="export")
        shown = {"IngestReport": _show_run, "EmbedReport": embed, "CaptionReport": _show_captions}
        (shown | {"BuildReport": _show_index, "ExportReport": export})[type(event).__name__](event)


def _show_run(report, stage: str = "ingest") -> None:
    """An ingest or embed run's summary (an embed's plan first), then its failures by reason."""
    summary = report.to_dict()
    if stage == "embed" and report.rows_planned == 0:
        mv = report.model_version
        return _console().print(f"nothing new to embed: every media_id in the manifest is in silver for {mv}")
    if stage == "embed":
        _console().print(report.physical_plan, markup=False)
        del summary["plan"], summary["failed_ids"]  # in the run's JSON
    failed = summary.pop("failed")
    _table(f"{stage} {report.run_id}", summary)
    _table("failed, by reason", failed.items(), ["reason", "count"], empty="")


def _show_captions(report) -> None:
    if not report.captions_planned and not report.pairs_scored:
        return _console().print(f"captions: nothing new to encode or score for {report.model_version}")
    _table(f"captions {report.run_id}", report.to_dict())


def _show_index(report) -> None:
    hidden = ("build_id", "recall_warning")  # the title; the warning line below the table
    shown = {k: v for k, v in vars(report).items() if k not in hidden} | {"path": _shown(report.path)}
    _table(f"published build {report.build_id}", shown)
    _warn_recall(report)


def _warn_recall(report) -> None:  # on stderr, with or without --json: the build is published all the same
    if report.recall_warning:
        print(f"warning: {report.recall_warning}", file=sys.stderr)


def _show_recall(report) -> None:
    """Recall@K as a table: rayclip's metadata definition (an EvalReport) or a benchmark's (a BenchmarkReport)."""
    t2i, i2t, saved = report.text_to_image, report.image_to_text, f"saved {_shown(report.path)}"
    if hasattr(report, "dataset"):
        split = f" {report.split} split" if report.split else ""
        title = f"{report.dataset}{split}, clip_benchmark's recall: {report.model_version} "
        title += f"({report.images} images, {report.captions} captions)"
        columns = [("text→image", t2i), ("chance", report.chance_text_to_image), ("image→text", i2t)]
        columns.append(("chance", report.chance_image_to_text))
        saved += f"\nreport {_shown(report.html)}"
    else:
        title = f"recall (rayclip's metadata definition), {report.model_version} "
        title += f"({report.images} images, {report.queries} distinct captions)"
        columns = [("text→image", t2i), ("image→text", i2t), ("chance (text→image)", report.chance_text_to_image)]
    rows = [[f"R@{k}", *(f"{values[k]:.3f}" for _, values in columns)] for k in t2i]
    _table(title, rows, ["", *(name for name, _ in columns)])
    _console().print(saved, markup=False)


def _print_results(results, as_json: bool, title: str) -> None:
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        return print(json.dumps([r.to_dict() for r in results], indent=2))
    rows = [[r.rank, f"{r.score:.4f}", r.caption or "", r.path or r.url or ""] for r in results]
    columns = ["rank", "cosine", "caption", "path"]
    if any(r.duplicates for r in results):  # collapse folded some: say how many per result
        rows, columns = [row + [r.duplicates or ""] for row, r in zip(rows, results)], columns + ["+near-dups"]
    _table(title, rows, columns)


def _options(args: argparse.Namespace, function) -> dict:
    """The options of this command that the function takes, as parsed."""
    takes = inspect.signature(function).parameters
    chosen = {name: getattr(args, name) for name in args.options if name in takes}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in chosen.items()}


def _run(function, args: argparse.Namespace, *positional, **given):
    return function(*positional, **_options(args, function) | given)


def _stage(args: argparse.Namespace, function, *positional, **given):
    """_run as one stage (pipeline.run_stage): its report shown when it ends, or with --json the one document."""
    hooks = _hooks(args.verbose, stage_reports=not args.json)
    report = pipeline.run_stage(function, *positional, hooks=hooks, **_options(args, function) | given)
    _emit(args, report.to_dict())
    return report


def _spec(args: argparse.Namespace, checked: bool = True):
    """The model the flags name; `checked` False leaves the names' check against open_clip (it imports
    torch) to the command, once it knows it has work."""
    from . import model

    spec = (model.resolve if checked else model.named)(args.model, args.pretrained)
    if spec.pretrained == model.RANDOM_INIT:
        warning = f"warning: {spec.name} with random weights (--pretrained none): for plumbing and speed only"
        print(warning, file=sys.stderr)
    return spec


def cmd_ingest(args: argparse.Namespace) -> int:
    """download metadata URLs (img2dataset), copy a folder or read downloaded shards into bronze"""
    from .stages import ingest

    root, stored = storage.data_root(args.data_dir), {"store_progress": "ingest store"}
    sources = {  # each source: its function and progress labels
        "metadata": (ingest.ingest_metadata, {"progress": "ingest download"} | stored),
        "folder": (ingest.ingest_folder, stored),
        "webdataset": (ingest.ingest_webdataset, {"progress": "ingest shards"}),
        "img2dataset_output": (ingest.ingest_img2dataset_output, {"progress": "ingest shards"}),
    }
    given = [name for name in sources if getattr(args, name)]
    if len(given) != 1:  # checked here, not by argparse, whose error would print its usage block first
        flags = " ".join("--" + name.replace("_", "-") for name in sources)
        raise UserError(f"give exactly one source of {flags}; got {len(given) or 'none'}")
    (function, labels), source = sources[given[0]], getattr(args, given[0])
    report = _stage(args, function, root, source, runs_dir=layout.ingest_runs_dir(root), progress=labels)
    # Exit 0 if anything usable came through (stored now, already stored before, or already known).
    return 0 if report.admitted or report.skipped_known_urls or not report.rows_read else 1


def cmd_embed(args: argparse.Namespace) -> int:
    """CLIP embeddings with Ray Data into silver"""
    from .stages import embed

    root, spec = storage.data_root(args.data_dir), _spec(args, checked=False)  # embed() checks it when it has work
    filed_as = embed.filed_as(spec, args.save_as).model_version
    _console().print(f"embedding with {spec.name} ({spec.pretrained}) as model_version={filed_as}")
    hooks, chosen = _hooks(args.verbose, stage_reports=not args.json), _options(args, embed.embed)
    embedded = pipeline.embed_command(root, spec, hooks=hooks, dashboard=args.dashboard, **chosen)  # no_captions too
    report, captioned = embedded  # with --json one document: the image run's record, the captions' inside it
    _emit(args, report.to_dict() | ({"captions": captioned.to_dict()} if captioned else {}))
    return 0 if report.rows_embedded or not report.rows_planned else 1


def cmd_index(args: argparse.Namespace) -> int:
    """build and publish a FAISS index from silver (gold)"""
    from .stages import index

    root = storage.data_root(args.data_dir)
    if args.rollback:
        old, new = index.rollback(root, args.model_version)
        document = {"model_version": args.model_version, "current": new, "previous": old}
        _emit(args, document, _console().print, f"CURRENT now {new} (was {old})")
        return 0
    report = _stage(args, index.build, root, progress={"progress": "index"})
    if args.json:  # without --json the report's table ends with the warning
        _warn_recall(report)
    return 0


def _terms(args: argparse.Namespace) -> list:
    """The query terms given (--q, --image, --like, …), each a Term."""
    from .query.searcher import Term

    return [Term.parse(kind, value, sign) for dest, kind, sign in args.terms for value in getattr(args, dest) or []]


def cmd_search(args: argparse.Namespace) -> int:
    """text→image or image→image search"""
    from .query import service

    terms = _terms(args)
    if not any(term.weight > 0 for term in terms):
        raise UserError("give something to search for: --q TEXT, --image FILE or --like MEDIA_ID")
    results = service.search(terms, _run(options.SearchOptions, args), args.data_dir)
    title = " ".join(term.title for term in terms).lstrip("+ ") + (f" where {args.where}" if args.where else "")
    _print_results(results, args.json, f"{title} — {results.model_version}, build {results.build_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """a subset (a query, --where, or both) out as webdataset tars, parquet or files, as img2dataset writes them"""
    from . import export

    root = storage.data_root(args.data_dir)
    runs, labels = layout.export_runs_dir(root), {"progress": "export"}
    report = _stage(args, export.export, root, args.to, _terms(args), runs_dir=runs, progress=labels)
    return 0 if report.exported or not report.selected else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """Recall@K through the whole pipeline: a benchmark or metadata"""
    spec, hooks = _spec(args), _hooks(args.verbose, stage_reports=not (args.dataset and args.json))
    if args.dataset:
        report = _run(pipeline.evaluate_benchmark, args, args.data_dir, args.dataset, spec=spec, hooks=hooks)
    else:
        report = _run(pipeline.evaluate_metadata, args, args.data_dir, args.metadata, spec, hooks=hooks).eval
    _emit(args, report.to_dict(), _show_recall, report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """the whole pipeline, offline, on generated data (make demo)"""
    _console().rule("rayclip demo: synthetic captioned images → img2dataset → Ray Data → FAISS → search")
    demo = _run(pipeline.run_demo, args, args.data_dir, hooks=_hooks(args.verbose))
    for query, results in demo.samples:
        _print_results(results, False, f"{query!r}")
    _show_recall(demo.run.eval)
    root = _shown(demo.root)
    _console().print(
        "\nNext: the same pipeline on real data and a cluster: README.md, Commands and Object stores and Ray clusters\n"
        f"  Explore this demo: rayclip search --data-dir {root} --q 'a small green square'\n"
        f"                     rayclip search --data-dir {root} --q 'a red cross' --where 'clip_score > 0'\n"
        f"                     rayclip serve --data-dir {root}",
        markup=False,
    )
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    """retrain the shipped offline reference model (about 9 minutes on 2 cores)"""
    from . import model
    from .train import train_reference

    out, console = Path(args.out) if args.out else model.REFERENCE_WEIGHTS, _console()
    console.print(f"training {model.REFERENCE_MODEL} for {args.steps} steps (seed {args.seed}) on CPU → {out}")
    summary = _run(train_reference, args, out=out, progress=lambda s, ls: console.print(f"step {s:4d}  loss {ls:.3f}"))
    _table("trained", summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """HTTP search service and web page"""
    import uvicorn

    from .http.app import API_KEY_ENV, check_bind, create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key, args.allow_anonymous)
    mib, origins = options.ServeOptions(max_upload_mb=args.max_upload_mb).max_upload_bytes, args.cors_origin
    app_options = _options(args, create_app) | {"max_upload_bytes": mib, "cors_origins": origins, "api_key": api_key}
    where = f"http://{args.host}:{args.port}/"
    served = _shown(storage.data_root(args.data_dir))
    guard = "API key required on /api/* and /metrics" if api_key else "no API key"
    if args.ray:
        return _serve_on_ray(args, app_options, served, where, guard)
    app = create_app(args.data_dir, **app_options)
    # A plain print: rich would wrap the address at 80 columns when stdout is not a terminal.
    print(f"rayclip serving {served} on {where} (API docs at {where}docs)", flush=True)
    print(f"status page {where}status · metrics {where}metrics · {guard}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _serve_on_ray(args: argparse.Namespace, app_options: dict, served: str, where: str, guard: str) -> int:
    """serve --ray: the app deployed through Ray Serve until Ctrl-C, then Serve taken down."""
    import signal

    from .http import ray_serve

    shards = ray_serve.deploy(args.data_dir, host=args.host, port=args.port, replicas=args.replicas, **app_options)
    held = f"{shards} shard deployments × {args.replicas} replicas" if shards else "one deployment (not in shards)"
    print(f"rayclip serving {served} through Ray Serve on {where} ({held}) · {guard}", flush=True)
    stop = threading.Event()
    for stopping in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a service manager's stop
        signal.signal(stopping, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    finally:
        ray_serve.shutdown()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """counts per layer: bronze, silver, gold"""
    from .store.status import status

    info = status(storage.data_root(args.data_dir))
    if args.json:
        _emit(args, info)
        return 0
    _console().print(f"data dir: {info['data_dir']}")
    _table("bronze", info["bronze"])
    silver, columns = [list(p.values()) for p in info["silver"]], ["model_version", "dt", "files", "rows"]
    _table("silver embeddings", silver, columns, empty="silver: no embeddings yet (run `rayclip embed`)")
    columns = ["model_version", "build_id", "count", "index", "size", "recall@10", "R@1 t→i", "created", ""]
    _table(
        "gold builds", [_gold_row(b) for b in info["gold"]], columns, empty="gold: no index yet (run `rayclip index`)"
    )
    debris = [[d["path"], d["bytes"]] for d in info["debris"]]
    _table("debris of killed runs (no reader sees it; `rayclip gc` removes it)", debris, ["path", "bytes"], empty="")
    return 0


def _size(n: int | None) -> str:
    from rich.filesize import decimal

    return "" if n is None else decimal(n)


def _gold_row(b: dict) -> list:
    recall = "" if b.get("recall_at_10") is None else f"{b['recall_at_10']:.3f}"
    first = f"{next(iter(b['eval']['text_to_image'].values())):.3f}" if b["eval"] else ""
    kept = {"shards": f" · {b['shards']} shards", "ondisk": " · on disk"}.get(b["form"], "")
    built = [b["model_version"], b["build_id"], b["count"], (b["index_type"] or "") + kept, _size(b["index_bytes"])]
    return built + [recall, first, b["created_at"], "CURRENT" if b["current"] else ""]


def cmd_gc(args: argparse.Namespace) -> int:
    """remove what killed runs left behind (work folders, temp files)"""
    from .store import debris

    root = storage.data_root(args.data_dir)
    removed = [str(path.relative_to(root)) for path in debris.sweep(root)]
    _emit(args, {"data_dir": str(root), "removed": removed}, _show_gc, root, removed)
    return 0


def _show_gc(root, removed: list[str]) -> None:
    for path in removed:
        print(f"removed {path}")
    _console().print(f"gc: {len(removed)} leftovers of killed runs removed from {_shown(root)}", markup=False)


# command: (handler: its docstring is the help, options: `Embed` is every field of EmbedOptions, `Embed:dt,limit` two)
COMMANDS = {
    "ingest": (cmd_ingest, "Ingest"),
    "embed": (cmd_embed, "Model Embed"),
    "index": (cmd_index, "Index"),
    "search": (cmd_search, "Search"),
    "export": (cmd_export, "Export Search:k,where,model_version,precision"),
    "eval": (cmd_eval, "Model Eval Embed:actors,batch_size Ingest:url_col,caption_col"),
    "demo": (cmd_demo, "Demo Embed:actors,batch_size Eval:recall_at"),
    "train-reference": (cmd_train_reference, "Train"),
    "serve": (cmd_serve, "Serve"),
    "status": (cmd_status, ""),
    "gc": (cmd_gc, ""),
}
_WITHOUT = {"--data-dir": {"train-reference"}, "--json": {"demo", "train-reference", "serve"}}
_WEIGHTED = "; repeatable, optional weight as in 2:TEXT"
# search's query terms, rclip-style: flags, term kind, sign, metavar, help
_TERMS = [
    (("--q", "--query"), "text", 1.0, None, "text query" + _WEIGHTED),
    (("--image",), "image", 1.0, None, "image file: find similar images" + _WEIGHTED),
    (("--add",), "text", 1.0, "TEXT", "add a text to the query" + _WEIGHTED),
    (("--subtract",), "text", -1.0, "TEXT", "subtract a text" + _WEIGHTED),
    (("--add-image",), "image", 1.0, "FILE", "add an image" + _WEIGHTED),
    (("--subtract-image",), "image", -1.0, "FILE", "subtract an image" + _WEIGHTED),
    (("--like",), "media_id", 1.0, "MEDIA_ID", "add an indexed image's stored vector"),
]


def build_parser() -> argparse.ArgumentParser:
    description = "Multimodal embedding and retrieval: img2dataset ingest, CLIP on Ray Data, FAISS search."
    parser = argparse.ArgumentParser(prog="rayclip", description=description)
    sub, made = parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), {}
    for name, (handler, spec) in COMMANDS.items():
        p = made[name] = sub.add_parser(name, help=handler.__doc__)
        if name not in _WITHOUT["--data-dir"]:
            p.add_argument("--data-dir", help=f"data root (default: ${storage.DATA_DIR_ENV}, else ./data)")
            verbose = "show Ray's and img2dataset's own logs too (always in the run's log)"
            p.add_argument("--verbose", action="store_true", help=verbose)
        if name not in _WITHOUT["--json"]:
            p.add_argument("--json", action="store_true", help="print one JSON document (the run record) on stdout")
        p.set_defaults(func=handler, options=options.add_flags(p, spec))
    metadata = "LAION-style metadata (URL, TEXT): .parquet, .csv, .tsv or .jsonl (a path or a URL)"
    ingest = made["ingest"].add_argument_group("source (exactly one)")
    evaluate = made["eval"].add_mutually_exclusive_group(required=True)
    ingest.add_argument("--metadata", help=metadata)
    ingest.add_argument("--folder", help="a folder of images (recursive; path or URL); captions from name.txt sidecars")
    shards = "WebDataset tar shards: braces ({00000..00099}) and globs, local or s3://; url/caption from .json/.txt"
    ingest.add_argument("--webdataset", metavar="PATTERN", nargs="+", help=shards)
    output = "what img2dataset wrote (webdataset, files or parquet format), with its per-shard .parquet statuses"
    ingest.add_argument("--img2dataset-output", metavar="DIR", help=output)
    benchmark = "a retrieval benchmark's annotations (clip_benchmark's recall; --metadata: rayclip's own)"
    evaluate.add_argument("--dataset", choices=["karpathy", "coco"], help=benchmark)
    evaluate.add_argument("--metadata", help=metadata)
    made["embed"].add_argument("--dashboard", action="store_true", help="start Ray's dashboard too; print its URL")
    made["index"].add_argument("--rollback", action="store_true", help="point CURRENT back at the previous build")
    for querying in (made["search"], made["export"]):  # each term flag's dest with the kind and sign of its terms
        added = [
            (querying.add_argument(*flags, action="append", metavar=m, help=h), kind, sign)
            for flags, kind, sign, m, h in _TERMS
        ]
        querying.set_defaults(terms=[(action.dest, kind, sign) for action, kind, sign in added])
    to = "where to write: a folder or an object-store prefix (s3://…), new or empty"
    made["export"].add_argument("--to", required=True, help=to)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _OUTPUT.update(json=getattr(args, "json", False), console=None)
    try:
        return args.func(args)
    except UserError as err:
        shown = err.named_by("--model-version") if isinstance(err, UnknownModelVersionError) else err
        print(f"rayclip {args.command}: error: {shown}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"rayclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
