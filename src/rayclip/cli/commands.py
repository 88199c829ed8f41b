"""The command handlers, `cmd_<name>(args) -> exit code`: each calls the library with the options
parsed for it (`_options`: the flags its function takes) and shows the result (show.py). A
handler's docstring is its command's help."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import threading
from pathlib import Path

from .. import options, pipeline
from ..errors import UserError
from ..store import layout, storage
from . import show


def _options(args: argparse.Namespace, function) -> dict:
    """The options of this command that the function takes, as parsed."""
    takes = inspect.signature(function).parameters
    chosen = {name: getattr(args, name) for name in args.options if name in takes}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in chosen.items()}


def _run(function, args: argparse.Namespace, *positional, **given):
    return function(*positional, **_options(args, function) | given)


def _stage(args: argparse.Namespace, function, *positional, **given):
    """_run as one stage (pipeline.run_stage): its report shown when it ends, or with --json the one document."""
    hooks = show.hooks(args.verbose, stage_reports=not args.json)
    report = pipeline.run_stage(function, *positional, hooks=hooks, **_options(args, function) | given)
    show.emit(args, report.to_dict())
    return report


def _spec(args: argparse.Namespace, checked: bool = True):
    """The model the flags name; `checked` False leaves the names' check against open_clip (it imports
    torch) to the command, once it knows it has work."""
    from .. import model

    spec = (model.resolve if checked else model.named)(args.model, args.pretrained)
    if spec.pretrained == model.RANDOM_INIT:
        warning = f"warning: {spec.name} with random weights (--pretrained none): for plumbing and speed only"
        print(warning, file=sys.stderr)
    return spec


def _terms(args: argparse.Namespace) -> list:
    """The query terms given (--q, --image, --like, …), each a Term."""
    from ..query.terms import Term

    return [Term.parse(kind, value, sign) for dest, kind, sign in args.terms for value in getattr(args, dest) or []]


def cmd_ingest(args: argparse.Namespace) -> int:
    """download metadata URLs (img2dataset), copy a folder or read downloaded shards into bronze"""
    from ..stages import ingest

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
    from ..stages import embed

    root, spec = storage.data_root(args.data_dir), _spec(args, checked=False)  # embed() checks it when it has work
    filed_as = embed.filed_as(spec, args.save_as).model_version
    show.console().print(f"embedding with {spec.name} ({spec.pretrained}) as model_version={filed_as}")
    hooks, chosen = show.hooks(args.verbose, stage_reports=not args.json), _options(args, embed.embed)
    embedded = pipeline.embed_command(root, spec, hooks=hooks, dashboard=args.dashboard, **chosen)  # no_captions too
    report, captioned = embedded  # with --json one document: the image run's record, the captions' inside it
    show.emit(args, report.to_dict() | ({"captions": captioned.to_dict()} if captioned else {}))
    return 0 if report.rows_embedded or not report.rows_planned else 1


def cmd_index(args: argparse.Namespace) -> int:
    """build and publish a FAISS index from silver (gold)"""
    from ..stages import index

    root = storage.data_root(args.data_dir)
    if args.rollback:
        old, new = index.rollback(root, args.model_version)
        document = {"model_version": args.model_version, "current": new, "previous": old}
        show.emit(args, document, show.console().print, f"CURRENT now {new} (was {old})")
        return 0
    report = _stage(args, index.build, root, progress={"progress": "index"})
    if args.json:  # without --json the report's table ends with the warning
        show.warn_recall(report)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """text→image or image→image search"""
    from ..query import service

    terms = _terms(args)
    if not any(term.weight > 0 for term in terms):
        raise UserError("give something to search for: --q TEXT, --image FILE or --like MEDIA_ID")
    results = service.search(terms, _run(options.SearchOptions, args), args.data_dir)
    title = " ".join(term.title for term in terms).lstrip("+ ") + (f" where {args.where}" if args.where else "")
    show.print_results(results, args.json, f"{title} — {results.model_version}, build {results.build_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """a subset (a query, --where, or both) out as webdataset tars, parquet or files, as img2dataset writes them"""
    from .. import export

    root = storage.data_root(args.data_dir)
    runs, labels = layout.export_runs_dir(root), {"progress": "export"}
    report = _stage(args, export.export, root, args.to, _terms(args), runs_dir=runs, progress=labels)
    return 0 if report.exported or not report.selected else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """Recall@K through the whole pipeline: a benchmark or metadata"""
    spec, hooks = _spec(args), show.hooks(args.verbose, stage_reports=not (args.dataset and args.json))
    if args.dataset:
        report = _run(pipeline.evaluate_benchmark, args, args.data_dir, args.dataset, spec=spec, hooks=hooks)
    else:
        report = _run(pipeline.evaluate_metadata, args, args.data_dir, args.metadata, spec, hooks=hooks).eval
    show.emit(args, report.to_dict(), show.show_recall, report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """the whole pipeline, offline, on generated data (make demo)"""
    show.console().rule("rayclip demo: synthetic captioned images → img2dataset → Ray Data → FAISS → search")
    demo = _run(pipeline.run_demo, args, args.data_dir, hooks=show.hooks(args.verbose))
    for query, results in demo.samples:
        show.print_results(results, False, f"{query!r}")
    show.show_recall(demo.run.eval)
    root = show.shown(demo.root)
    show.console().print(
        "\nNext: the same pipeline on real data and a cluster: README.md, Commands and Object stores and Ray clusters\n"
        f"  Explore this demo: rayclip search --data-dir {root} --q 'a small green square'\n"
        f"                     rayclip search --data-dir {root} --q 'a red cross' --where 'clip_score > 0'\n"
        f"                     rayclip serve --data-dir {root}",
        markup=False,
    )
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    """retrain the shipped offline reference model (about 9 minutes on 2 cores)"""
    from .. import model
    from ..train import train_reference

    out, console = Path(args.out) if args.out else model.REFERENCE_WEIGHTS, show.console()
    console.print(f"training {model.REFERENCE_MODEL} for {args.steps} steps (seed {args.seed}) on CPU → {out}")
    summary = _run(train_reference, args, out=out, progress=lambda s, ls: console.print(f"step {s:4d}  loss {ls:.3f}"))
    show.table("trained", summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """HTTP search service and web page"""
    import uvicorn

    from ..http.app import create_app
    from ..http.guard import API_KEY_ENV, check_bind

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key, args.allow_anonymous)
    mib, origins = options.ServeOptions(max_upload_mb=args.max_upload_mb).max_upload_bytes, args.cors_origin
    app_options = _options(args, create_app) | {"max_upload_bytes": mib, "cors_origins": origins, "api_key": api_key}
    where = f"http://{args.host}:{args.port}/"
    root = storage.data_root(args.data_dir)
    served = show.shown(root)
    guard = "API key required on /api/* and /metrics" if api_key else "no API key"
    if args.ray:
        return _serve_on_ray(args, root, app_options, served, where, guard)
    app = create_app(root, **app_options)
    # A plain print: rich would wrap the address at 80 columns when stdout is not a terminal.
    print(f"rayclip serving {served} on {where} (API docs at {where}docs)", flush=True)
    print(f"status page {where}status · metrics {where}metrics · {guard}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _serve_on_ray(
    args: argparse.Namespace, root: storage.Location, app_options: dict, served: str, where: str, guard: str
) -> int:
    """serve --ray: the app deployed through Ray Serve until Ctrl-C, then Serve taken down."""
    import signal

    from ..http import ray_serve

    shards = ray_serve.deploy(
        root, host=args.host, port=args.port, replicas=args.replicas, deploy_timeout=args.deploy_timeout, **app_options
    )
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
    from ..store.status import status

    info = status(storage.data_root(args.data_dir))
    show.emit(args, info, show.show_status, info)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """remove what killed runs left behind (work folders, temp files)"""
    from ..store import debris

    root = storage.data_root(args.data_dir)
    removed = [str(path.relative_to(root)) for path in debris.sweep(root)]
    show.emit(args, {"data_dir": str(root), "removed": removed}, show.show_gc, root, removed)
    return 0
