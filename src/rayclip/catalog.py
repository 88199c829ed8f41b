"""Every read of a layer: what is committed in bronze, silver and gold, and the run records.

The stages write their own layer and read the others only through here, so they stand side by side:
ingest, embed, index, search, status and the server import the catalog, not each other.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from . import layout, storage
from .errors import UserError
from .storage import Location

MANIFEST_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("size_bytes", pa.int64()),
        ("source", pa.string()),
        ("run_id", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)


# bronze
def manifest_parts(root: Location) -> list[Location]:
    """The committed manifest parts: each is one object written whole, so listed means committed."""
    return storage.glob(layout.manifest_dir(root), "part-*.parquet")


def read_manifest(root: Location, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest (every committed part), or an empty table with its schema."""
    parts = manifest_parts(root)
    if not parts:
        schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    tables = []
    for part in parts:
        with storage.open_input(part) as f:
            tables.append(pq.read_table(f, columns=columns, schema=MANIFEST_SCHEMA))
    return pa.concat_tables(tables)


# silver
def silver_model_versions(root: Location) -> list[str]:
    """Model versions with at least one committed embed run."""
    found = storage.glob(layout.embeddings_dir(root), "model_version=*/_commits/*.json")
    return sorted({f.parent.parent.name.split("=", 1)[1] for f in found})


def silver_commits(root: Location, model_version: str) -> list[dict]:
    """The commit records of a model_version's runs, oldest first: run_id, dt, files (name, rows), rows.

    A run's Parquet files are data only once its record, written after all of them, exists."""
    return [storage.read_json(f) for f in storage.glob(layout.silver_commits_dir(root, model_version), "*.json")]


def silver_files(root: Location, model_version: str, day: str | None = None) -> list[Location]:
    """The committed silver Parquet files of a model_version (one dt partition, or all), by name."""
    day = layout.check_day(day) if day else None
    folder = layout.silver_model_dir(root, model_version)
    names = [f["name"] for c in silver_commits(root, model_version) if day in (None, c["dt"]) for f in c["files"]]
    return sorted((folder / name for name in names), key=str)


# gold
def gold_model_versions(root: Location) -> list[str]:
    """Model versions with a published index (a CURRENT)."""
    folders = storage.glob(root / "gold", "*")
    return sorted(f.name for f in folders if storage.exists(layout.current_file(root, f.name)))


def builds(root: Location, model_version: str) -> list[str]:
    """Finished builds of a model_version, oldest first (build ids sort in time order)."""
    found = storage.glob(layout.builds_dir(root, model_version), "*/build.json")
    return sorted(f.parent.name for f in found if not f.parent.name.startswith("."))


def current_build(root: Location, model_version: str) -> str | None:
    current = layout.current_file(root, model_version)
    return storage.read_text(current).strip() if storage.exists(current) else None


def pick_model_version(root: Location, asked: str | None, available: list[str], layer: str) -> str:
    """The asked model_version, or the only one present; else one clear line listing them."""
    if asked:
        if asked not in available:
            raise UserError(f"no {layer} for model_version {asked!r}; present: {', '.join(available) or 'none'}")
        return asked
    if not available:
        hint = "run `rayclip embed`" if layer == "embeddings" else "run `rayclip index`"
        raise UserError(f"no {layer} yet under {root}; {hint}")
    if len(available) > 1:
        raise UserError(f"several model_versions present ({', '.join(available)}); pick one with --model-version")
    return available[0]


# run records
def run_records(root: Location) -> list[tuple[str, Location, dict]]:
    """(stage, record location, record) for every ingest and embed run record."""
    records = []
    for stage, folder in (("ingest", layout.ingest_runs_dir(root)), ("embed", layout.embed_runs_dir(root))):
        records += [(stage, path, storage.read_json(path)) for path in storage.glob(folder, "*.json")]
    return records
