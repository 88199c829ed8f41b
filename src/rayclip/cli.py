"""`rayclip` command line: one subcommand per stage.

Heavy libraries (torch, ray, faiss) are imported inside the commands that use them,
so `rayclip --help` answers at once. This is the only module that prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import layout
from .errors import UserError


def _console():
    from rich.console import Console

    return Console(highlight=False)


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
    from . import ingest

    root = layout.data_root(args.data_dir)
    if args.folder:
        report = ingest.ingest_folder(root, Path(args.folder), limit=args.limit)
    else:
        report = ingest.ingest_metadata(
            root,
            Path(args.metadata),
            url_col=args.url_col,
            caption_col=args.caption_col,
            limit=args.limit,
            processes=args.processes,
            threads=args.threads,
            timeout=args.timeout,
            retries=args.retries,
        )
    summary = report.to_dict()
    failed = summary.pop("failed")
    _print_kv(f"ingest {report.run_id}", summary)
    if failed:
        _console().print(_table("failed, by reason", ["reason", "count"], [[k, v] for k, v in failed.items()]))
    # Exit 0 if anything usable came through (stored now or already stored before).
    return 0 if report.downloaded or not report.rows_read else 1


# ------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    from .status import status

    info = status(layout.data_root(args.data_dir))
    if args.json:
        print(json.dumps(info, indent=2))
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
    rows = [[b["model_version"], b["build_id"], b["count"], b["created_at"], "CURRENT" if b["current"] else ""] for b in gold]
    console.print(
        _table("gold builds", ["model_version", "build_id", "count", "created", ""], rows)
        if gold
        else "gold: no index yet (run `rayclip index`)"
    )
    return 0


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
        help=f"data root (default: ${layout.DATA_DIR_ENV}, else ./data)",
    )

    p = sub.add_parser("ingest", parents=[common], help="download metadata URLs (img2dataset) or copy a folder into bronze")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--metadata", help="LAION-style metadata: .parquet, .csv, .tsv or .jsonl")
    source.add_argument("--folder", help="a local folder of images (recursive); captions from name.txt sidecars")
    p.add_argument("--url-col", default=None, help="URL column (default: URL, else url)")
    p.add_argument("--caption-col", default=None, help="caption column (default: TEXT, else caption/text)")
    p.add_argument("--limit", type=_positive_int, default=None, help="read at most N rows")
    p.add_argument("--processes", type=_positive_int, default=1, help="img2dataset processes")
    p.add_argument("--threads", type=_positive_int, default=16, help="img2dataset threads per process")
    p.add_argument("--timeout", type=_positive_int, default=10, help="seconds per download")
    p.add_argument("--retries", type=int, default=0, help="retries per URL")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("status", parents=[common], help="counts per layer: bronze, silver, gold")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
