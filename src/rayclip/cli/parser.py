"""The argument parser: a subcommand per handler (its docstring the help), each command's option
flags generated from options.py's dataclasses, plus the flags that are not options (the sources of
an ingest, the query terms of a search or an export)."""

from __future__ import annotations

import argparse

from .. import options
from ..store import storage
from .commands import (
    cmd_demo,
    cmd_embed,
    cmd_eval,
    cmd_export,
    cmd_gc,
    cmd_index,
    cmd_ingest,
    cmd_search,
    cmd_serve,
    cmd_status,
    cmd_train_reference,
)

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
    _add_sources(made["ingest"], made["eval"])
    made["embed"].add_argument("--dashboard", action="store_true", help="start Ray's dashboard too; print its URL")
    made["index"].add_argument("--rollback", action="store_true", help="point CURRENT back at the previous build")
    for querying in (made["search"], made["export"]):
        _add_terms(querying)
    to = "where to write: a folder or an object-store prefix (s3://…), new or empty"
    made["export"].add_argument("--to", required=True, help=to)
    return parser


def _add_sources(ingest: argparse.ArgumentParser, evaluate: argparse.ArgumentParser) -> None:
    """What an ingest reads (exactly one source, checked by the handler) and what an eval measures."""
    metadata = "LAION-style metadata (URL, TEXT): .parquet, .csv, .tsv or .jsonl (a path or a URL)"
    source = ingest.add_argument_group("source (exactly one)")
    source.add_argument("--metadata", help=metadata)
    source.add_argument("--folder", help="a folder of images (recursive; path or URL); captions from name.txt sidecars")
    shards = "WebDataset tar shards: braces ({00000..00099}) and globs, local or s3://; url/caption from .json/.txt"
    source.add_argument("--webdataset", metavar="PATTERN", nargs="+", help=shards)
    output = "what img2dataset wrote (webdataset, files or parquet format), with its per-shard .parquet statuses"
    source.add_argument("--img2dataset-output", metavar="DIR", help=output)
    measured = evaluate.add_mutually_exclusive_group(required=True)
    benchmark = "a retrieval benchmark's annotations (clip_benchmark's recall; --metadata: rayclip's own)"
    measured.add_argument("--dataset", choices=["karpathy", "coco"], help=benchmark)
    measured.add_argument("--metadata", help=metadata)


def _add_terms(querying: argparse.ArgumentParser) -> None:
    """The query term flags; each flag's dest with the kind and sign of its terms (commands._terms reads them)."""
    added = [
        (querying.add_argument(*flags, action="append", metavar=m, help=h), kind, sign)
        for flags, kind, sign, m, h in _TERMS
    ]
    querying.set_defaults(terms=[(action.dest, kind, sign) for action, kind, sign in added])
