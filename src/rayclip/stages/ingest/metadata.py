"""Reading LAION-style metadata (a file of URL and TEXT columns, local or a URL) into the url/caption
table that img2dataset downloads from; what a row's URL lacks to be fetched at all."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import MISSING_URL, UserError
from ...options import IngestOptions
from ...store import storage
from ...store.catalog import Refused
from ...store.storage import Location

URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")


def read_metadata(
    path: str | os.PathLike,
    url_col: str | None = IngestOptions.url_col,
    caption_col: str | None = IngestOptions.caption_col,
    limit: int | None = IngestOptions.limit,
) -> pa.Table:
    """Read LAION-style metadata (a local file or a URL) into a table with two string columns: url, caption."""
    source = storage.location(path)
    if not storage.exists(source) or storage.is_dir(source):
        raise UserError(f"metadata file not found: {path}")
    table = _read_table(source, path)
    columns = table.column_names
    url_name = _pick_column(columns, url_col, URL_COLUMNS, "--url-col")
    caption_name = _pick_column(columns, caption_col, CAPTION_COLUMNS, "--caption-col", required=False)
    if table.num_rows == 0:
        raise UserError(f"metadata file {path} has no rows")
    if limit is not None:
        table = table.slice(0, limit)
    urls = table.column(url_name).cast(pa.string())
    captions = (
        table.column(caption_name).cast(pa.string()).fill_null("")
        if caption_name
        else pa.array([""] * table.num_rows, pa.string())
    )
    return pa.table({"url": urls, "caption": captions})


def _read_table(source: Location, shown: str | os.PathLike) -> pa.Table:
    name = source.name.lower().removesuffix(".gz")
    fs, where = storage.arrow(source)
    try:
        if name.endswith(".parquet"):
            return pq.read_table(where, filesystem=fs)
        if name.endswith((".csv", ".tsv", ".jsonl", ".json")):
            with fs.open_input_stream(where, compression="detect") as stream:  # .gz by its name
                if name.endswith((".jsonl", ".json")):
                    import pyarrow.json as pajson

                    return pajson.read_json(stream)
                import pyarrow.csv as pacsv

                delimiter = "\t" if name.endswith(".tsv") else ","
                return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read metadata {shown}: {first_line}") from None
    raise UserError(f"unsupported metadata format: {source.name} (use .parquet, .csv, .tsv or .jsonl)")


def _pick_column(
    columns: list[str], asked: str | None, defaults: tuple[str, ...], flag: str, required: bool = True
) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise UserError(f"column {asked!r} not found; columns are: {', '.join(columns)} (pass {flag})")
        return asked
    for name in defaults:
        if name in columns:
            return name
    if required:
        raise UserError(
            f"no URL column ({' or '.join(defaults)}) found; columns are: {', '.join(columns)} (pass {flag})"
        )
    return None


def url_problem(url: str | None) -> Refused | None:
    """Why a row's URL cannot be fetched, or None."""
    if url is None or not url.strip():
        return Refused(MISSING_URL)
    if not url.lower().startswith(("http://", "https://")):
        return Refused("unsupported url scheme")
    return None
