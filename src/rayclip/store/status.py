"""Counts per layer: what `rayclip status` shows."""

from __future__ import annotations

import pyarrow.compute as pc

from . import catalog, debris, layout, storage
from .catalog import BuildInfo
from .storage import Location


def bronze_status(root: Location) -> dict:
    manifest = catalog.read_manifest(root, ["media_id"])
    objects = [p for p in storage.glob(layout.objects_dir(root), layout.STORED_OBJECTS) if not p.name.startswith(".")]
    return {
        "manifest_rows": manifest.num_rows,
        "unique_media_ids": len(pc.unique(manifest.column("media_id"))),
        "objects": len(objects),
        "object_bytes": sum(storage.size(p) for p in objects),
        "ingest_runs": len(storage.glob(layout.ingest_runs_dir(root), layout.RUN_RECORDS)),
    }


def silver_status(root: Location) -> list[dict]:
    """One entry per (model_version, dt) partition, counting committed files only."""
    out = []
    for model_version in catalog.silver_model_versions(root):
        partitions: dict[str, list[Location]] = {}
        for f in catalog.silver_files(root, model_version):
            partitions.setdefault(layout.partition_value(f.parent.name), []).append(f)
        out += [
            {
                "model_version": model_version,
                "dt": day,
                "files": len(files),
                "rows": sum(catalog.parquet_metadata(f).num_rows for f in files),  # from the footers, no data read
            }
            for day, files in sorted(partitions.items())
        ]
    return out


def gold_status(root: Location) -> list[dict]:
    """One entry per build, CURRENT marked."""
    out = []
    # Every model_version folder, even one whose CURRENT was never written (a build then stays listed).
    for model_version in catalog.gold_model_versions(root, published=False):
        current_id = catalog.current_build(root, model_version)
        for build_id in catalog.builds(root, model_version):
            folder = layout.build_dir(root, model_version, build_id)
            info = BuildInfo.read(layout.build_info_file(folder))
            out.append(
                {
                    "model_version": model_version,
                    "build_id": build_id,
                    "count": info.count,
                    "created_at": info.created_at,
                    "current": build_id == current_id,
                    **_build_details(folder, info),
                }
            )
    return out


def _build_details(folder: Location, info: BuildInfo) -> dict:
    """Index type, how it is kept (form, shards) and its size (what a server reading it into RAM
    holds; `serve --mmap` maps it instead), what the build measured of itself (recall; builds before
    measured recall show none) and its eval, where known."""
    index_file = layout.index_file(folder)
    eval_file = layout.eval_file(folder)
    held = catalog.index_bytes(info) or None
    return {
        "index_type": info.index_type,
        "form": info.form,
        "shards": len(info.shards or []),
        "index_bytes": held or (storage.size(index_file) if storage.exists(index_file) else None),
        "recall_at_10": info.recall_at_10,
        "base_build": info.base_build,
        "eval": storage.read_json(eval_file) if storage.exists(eval_file) else None,
    }


def debris_status(root: Location) -> list[dict]:
    """Leftovers of killed runs (no reader sees them; `rayclip gc` or the next run sweeps them)."""
    return [{"path": str(p.relative_to(root)), "bytes": storage.tree_size(p)} for p in debris.find(root)]


def recent_runs(root: Location, limit: int = 12) -> list[dict]:
    """The newest ingest and embed run records (newest first): rows through, failures by reason."""
    rows_key = {"ingest": "admitted", "embed": "rows_embedded"}
    runs = [
        {
            "stage": stage,
            "run_id": record["run_id"],
            "rows": record.get(rows_key[stage], 0),
            "failed": record.get("failed", {}),
            "wall_s": record.get("wall_s", 0.0),
            "log": storage.exists(layout.run_log(path.parent, record["run_id"])),
        }
        for stage, path, record in catalog.run_records(root)
    ]
    return sorted(runs, key=lambda r: r["run_id"], reverse=True)[:limit]


def status(root: Location) -> dict:
    return {
        "data_dir": storage.uri(root),
        "bronze": bronze_status(root),
        "silver": silver_status(root),
        "gold": gold_status(root),
        "debris": debris_status(root),
        "runs": recent_runs(root),
    }


PROC_STATUS = "/proc/self/status"
MEMORY_FIELDS = {"RssAnon": "resident_private_bytes", "RssFile": "resident_file_bytes"}


def process_memory() -> dict:
    """This process's resident memory (Linux /proc): private (RssAnon: what an index read into RAM
    holds) and file-backed (RssFile: the pages of mapped files read so far, which the kernel may drop
    and read again); {} where /proc has none."""
    try:
        with open(PROC_STATUS) as f:
            lines = [line.split(":", 1) for line in f if line.split(":", 1)[0] in MEMORY_FIELDS]
    except OSError:
        return {}
    return {MEMORY_FIELDS[name]: int(value.split()[0]) * 1024 for name, value in lines}  # /proc counts kB
