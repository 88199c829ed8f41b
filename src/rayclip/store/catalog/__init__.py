"""Every read of a layer: what is committed in bronze, silver and gold, and the run records.

One module per layer (`bronze`, `silver`, `gold`), a build's files (`gold_files`), the run
records (`runs`), and how a committed object is read (`committed`); callers use `catalog.<name>`.

The stages write their own layer and read the others only through here, so they stand side by side:
ingest, embed, index, search, status and the server import the catalog, not each other.

A committed object is read against the size its commit recorded (a manifest part's name, a silver
commit record, build.json), so what a store hands back short or empty is refused, never parsed.
Objects committed before sizes were recorded are read as before, but an empty one is refused too.
"""

from .bronze import (
    CHANGED_OBJECT,
    MANIFEST_SCHEMA,
    MISSING_OBJECT,
    Refused,
    find_object,
    iter_manifest,
    manifest_parts,
    read_manifest,
    read_object,
    write_manifest_part,
)
from .committed import parquet_metadata, read_parquet, recorded_size
from .gold import (
    BuildInfo,
    build_info,
    builds,
    current_build,
    gold_model_versions,
    index_bytes,
    index_files,
    pick_indexed,
    pick_model_version,
)
from .gold_files import (
    SERVED_BATCH_ROWS,
    map_arrow,
    merged_on_disk,
    read_index,
    served_table_writer,
    write_index,
    write_served_table,
)
from .runs import run_records, write_run_record
from .silver import (
    newest_per_key,
    read_silver,
    recorded_model,
    silver_commits,
    silver_files,
    silver_latest,
    silver_model,
    silver_model_versions,
    vector_matrix,
)

__all__ = [
    "CHANGED_OBJECT",
    "MANIFEST_SCHEMA",
    "MISSING_OBJECT",
    "SERVED_BATCH_ROWS",
    "BuildInfo",
    "Refused",
    "build_info",
    "builds",
    "current_build",
    "find_object",
    "gold_model_versions",
    "index_bytes",
    "index_files",
    "iter_manifest",
    "manifest_parts",
    "map_arrow",
    "merged_on_disk",
    "newest_per_key",
    "parquet_metadata",
    "pick_indexed",
    "pick_model_version",
    "read_index",
    "read_manifest",
    "read_object",
    "read_parquet",
    "read_silver",
    "recorded_model",
    "recorded_size",
    "run_records",
    "served_table_writer",
    "silver_commits",
    "silver_files",
    "silver_latest",
    "silver_model",
    "silver_model_versions",
    "vector_matrix",
    "write_index",
    "write_manifest_part",
    "write_run_record",
    "write_served_table",
]
