"""What the commands print: with --json one JSON document on stdout (everything else on stderr),
else rich tables and lines for people; each report kind has its view here."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from .. import pipeline
from .bars import Bar

# With --json, `document` carries the JSON document alone; everything else goes to stderr.
_OUTPUT: dict = {"json": False, "console": None, "document": None, "stdout": None}


def start(as_json: bool, owns_process: bool = False) -> None:
    """A command begins. With --json, stdout carries the document alone: whatever else would print
    there while the command runs (Ray's notes on its workers, a library's print) goes to stderr. In a
    process of its own, descriptor 1 goes to stderr too, for the rest of the process (Ray's C++ core,
    and Ray's shut-down at exit, print there after the command has returned)."""
    document = sys.stdout
    if as_json and owns_process:
        sys.stdout.flush()
        document = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    _OUTPUT.update(json=as_json, console=None, document=document, stdout=sys.stdout)
    if as_json:
        sys.stdout = sys.stderr


def finish() -> None:
    """A command has returned: stdout as it was (a process of its own is about to exit: it stays on stderr)."""
    if _OUTPUT["document"] is _OUTPUT["stdout"]:
        sys.stdout = _OUTPUT["stdout"]


def _document(text: str) -> None:
    print(text, file=_OUTPUT["document"], flush=True)


def console():
    from rich.console import Console

    if _OUTPUT["console"] is None:  # soft_wrap: no hard wraps in plain lines (paths, URLs)
        _OUTPUT["console"] = Console(highlight=False, soft_wrap=True, stderr=_OUTPUT["json"])
    return _OUTPUT["console"]


def emit(args: argparse.Namespace, document, show=None, *shown) -> None:
    """The JSON document on stdout with --json, else what show(*shown) draws for people."""
    if args.json:
        _document(json.dumps(document, indent=2, default=str))
    elif show is not None:
        show(*shown)


def table(title: str, rows: list[list] | dict, columns: list[str] | None = None, empty: str | None = None) -> None:
    """rows under the columns, a dict's key, value pairs without a header; no rows and `empty`: that line instead."""
    from rich.table import Table

    if not rows and empty is not None:
        return console().print(empty) if empty else None
    drawn = Table(title=title, title_justify="left", show_header=columns is not None)
    for name in columns or ["", ""]:
        drawn.add_column(name)
    for row in rows.items() if isinstance(rows, dict) else rows:
        drawn.add_row(*[str(v) for v in row])
    console().print(drawn)


def shown(path: Path | str) -> str:
    """A path as the user can type it: relative to the working directory when under it."""
    try:
        return str(Path(str(path)).relative_to(Path.cwd()))  # str: an s3:// location is not a path
    except ValueError:  # elsewhere
        return str(path)


def hooks(verbose: bool = False, stage_reports: bool = True) -> pipeline.Hooks:
    """What a library run shows here: progress bars (none with --json: stdout is for the document),
    each stage's summary (unless stage_reports is off), the demo's site and Ray's dashboard."""
    as_json, report = _OUTPUT["json"], functools.partial(_show_event, stage_reports=stage_reports)
    bars = (lambda label, terminal: None) if as_json else Bar
    return pipeline.Hooks(bars, report, verbose, terminal_fd=2 if as_json else 1)


def _show_event(event, terminal: TextIO, stage_reports: bool = True) -> None:
    if isinstance(event, pipeline.RayDashboard):
        print(f"Ray dashboard: {event.url or 'not running on this cluster'}", file=terminal, flush=True)
    elif isinstance(event, pipeline.DemoSite):
        held_out = f"seed {event.seed}, not used in training"
        console().print(f"generated {event.images} captioned JPEGs in {shown(event.folder)} ({held_out})")
        console().print(f"serving them at {event.base_url}; metadata in LAION format (URL, TEXT)")
    elif stage_reports:  # a stage's report
        embed = functools.partial(_show_run, stage="embed")
        export = functools.partial(_show_run, stage="export")
        views = {"IngestReport": _show_run, "EmbedReport": embed, "CaptionReport": _show_captions}
        (views | {"BuildReport": _show_index, "ExportReport": export})[type(event).__name__](event)


def _show_run(report, stage: str = "ingest") -> None:
    """An ingest or embed run's summary (an embed's plan first), then its failures by reason."""
    summary = report.to_dict()
    if stage == "embed" and report.rows_planned == 0:
        mv = report.model_version
        return console().print(f"nothing new to embed: every media_id in the manifest is in silver for {mv}")
    if stage == "embed":
        console().print(report.physical_plan, markup=False)
        del summary["plan"], summary["failed_ids"]  # in the run's JSON
    failed = summary.pop("failed")
    table(f"{stage} {report.run_id}", summary)
    table("failed, by reason", failed.items(), ["reason", "count"], empty="")


def _show_captions(report) -> None:
    if not report.captions_planned and not report.pairs_scored:
        return console().print(f"captions: nothing new to encode or score for {report.model_version}")
    table(f"captions {report.run_id}", report.to_dict())


def _show_index(report) -> None:
    hidden = ("build_id", "recall_warning")  # the title; the warning line below the table
    rows = {k: v for k, v in vars(report).items() if k not in hidden} | {"path": shown(report.path)}
    table(f"published build {report.build_id}", rows)
    warn_recall(report)


def warn_recall(report) -> None:  # on stderr, with or without --json: the build is published all the same
    if report.recall_warning:
        print(f"warning: {report.recall_warning}", file=sys.stderr)


def show_recall(report) -> None:
    """Recall@K as a table: rayclip's metadata definition (an EvalReport) or a benchmark's (a BenchmarkReport)."""
    t2i, i2t, saved = report.text_to_image, report.image_to_text, f"saved {shown(report.path)}"
    if hasattr(report, "dataset"):
        split = f" {report.split} split" if report.split else ""
        title = f"{report.dataset}{split}, clip_benchmark's recall: {report.model_version} "
        title += f"({report.images} images, {report.captions} captions)"
        columns = [("text→image", t2i), ("chance", report.chance_text_to_image), ("image→text", i2t)]
        columns.append(("chance", report.chance_image_to_text))
        saved += f"\nreport {shown(report.html)}"
    else:
        title = f"recall (rayclip's metadata definition), {report.model_version} "
        title += f"({report.images} images, {report.queries} distinct captions)"
        columns = [("text→image", t2i), ("image→text", i2t), ("chance (text→image)", report.chance_text_to_image)]
    rows = [[f"R@{k}", *(f"{values[k]:.3f}" for _, values in columns)] for k in t2i]
    table(title, rows, ["", *(name for name, _ in columns)])
    console().print(saved, markup=False)


def print_results(results, as_json: bool, title: str) -> None:
    for note in results.notes:
        print(f"note: {note}", file=sys.stderr)
    if as_json:
        return _document(json.dumps([r.to_dict() for r in results], indent=2))
    rows = [[r.rank, f"{r.score:.4f}", r.caption or "", r.path or r.url or ""] for r in results]
    columns = ["rank", "cosine", "caption", "path"]
    if any(r.duplicates for r in results):  # collapse folded some: say how many per result
        rows, columns = [row + [r.duplicates or ""] for row, r in zip(rows, results)], columns + ["+near-dups"]
    table(title, rows, columns)


def show_status(info: dict) -> None:
    """`rayclip status` for people: the data dir, then a table per layer and the debris."""
    console().print(f"data dir: {info['data_dir']}")
    table("bronze", info["bronze"])
    silver, columns = [list(p.values()) for p in info["silver"]], ["model_version", "dt", "files", "rows"]
    table("silver embeddings", silver, columns, empty="silver: no embeddings yet (run `rayclip embed`)")
    columns = ["model_version", "build_id", "count", "index", "size", "recall@10", "R@1 t→i", "created", ""]
    gold = [_gold_row(b) for b in info["gold"]]
    table("gold builds", gold, columns, empty="gold: no index yet (run `rayclip index`)")
    debris = [[d["path"], d["bytes"]] for d in info["debris"]]
    table("debris of killed runs (no reader sees it; `rayclip gc` removes it)", debris, ["path", "bytes"], empty="")


def _size(n: int | None) -> str:
    from rich.filesize import decimal

    return "" if n is None else decimal(n)


def _gold_row(b: dict) -> list:
    recall = "" if b.get("recall_at_10") is None else f"{b['recall_at_10']:.3f}"
    first = f"{next(iter(b['eval']['text_to_image'].values())):.3f}" if b["eval"] else ""
    kept = {"shards": f" · {b['shards']} shards", "ondisk": " · on disk"}.get(b["form"], "")
    built = [b["model_version"], b["build_id"], b["count"], (b["index_type"] or "") + kept, _size(b["index_bytes"])]
    return built + [recall, first, b["created_at"], "CURRENT" if b["current"] else ""]


def show_gc(root, removed: list[str]) -> None:
    for path in removed:
        print(f"removed {path}")
    console().print(f"gc: {len(removed)} leftovers of killed runs removed from {shown(root)}", markup=False)
