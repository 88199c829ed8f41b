"""Counts per layer: what `rayclip status` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc

from . import catalog, debris, layout, storage


def bronze_status(root: Path) -> dict:
    manifest = catalog.read_manifest(root, ["media_id"])
    objects = [p for p in layout.objects_dir(root).glob("*/*") if not p.name.startswith(".")]
    return {
        "manifest_rows": manifest.num_rows,
        "unique_media_ids": len(pc.unique(manifest.column("media_id"))),
        "objects": len(objects),
        "object_bytes": sum(p.stat().st_size for p in objects),
        "ingest_runs": len(list(layout.ingest_runs_dir(root).glob("*.json"))),
    }


def silver_status(root: Path) -> list[dict]:
    """One entry per (model_version, dt) partition."""
    import pyarrow.parquet as pq

    out = []
    for part in sorted(layout.embeddings_dir(root).glob("model_version=*/dt=*")):
        files = sorted(part.glob("*.parquet"))
        out.append(
            {
                "model_version": part.parent.name.split("=", 1)[1],
                "dt": part.name.split("=", 1)[1],
                "files": len(files),
                "rows": sum(pq.read_metadata(f).num_rows for f in files),  # from the footers, no data read
            }
        )
    return out


def gold_status(root: Path) -> list[dict]:
    """One entry per build, CURRENT marked."""
    out = []
    gold = root / "gold"
    # Every model_version folder, even one whose CURRENT was never written (a build then stays listed).
    for model_version in sorted(p.name for p in gold.iterdir() if p.is_dir()) if gold.is_dir() else []:
        current_id = catalog.current_build(root, model_version)
        for build_id in catalog.builds(root, model_version):
            folder = layout.build_dir(root, model_version, build_id)
            info = json.loads((folder / "build.json").read_text())
            out.append(
                {
                    "model_version": model_version,
                    "build_id": build_id,
                    "count": info["count"],
                    "created_at": info["created_at"],
                    "current": build_id == current_id,
                    **_build_details(folder, info),
                }
            )
    return out


def _build_details(folder: Path, info: dict) -> dict:
    """Index type, its size (what a server holds in memory), what the build measured of itself
    (recall; builds before measured recall show none) and its eval, where known."""
    index_file = folder / "index.faiss"
    eval_file = folder / "eval.json"
    recall = info.get("recall") or {}
    return {
        "index_type": info.get("index_type"),
        "index_bytes": info.get("index_bytes") or (index_file.stat().st_size if index_file.is_file() else None),
        "recall_at_10": recall.get("recall_at_10"),
        "base_build": info.get("base_build"),
        "eval": json.loads(eval_file.read_text()) if eval_file.is_file() else None,
    }


def debris_status(root: Path) -> list[dict]:
    """Leftovers of killed runs (no reader sees them; `rayclip gc` or the next run sweeps them)."""
    return [{"path": str(p.relative_to(root)), "bytes": storage.tree_size(p)} for p in debris.find(root)]


def recent_runs(root: Path, limit: int = 12) -> list[dict]:
    """The newest ingest and embed run records (newest first): rows through, failures by reason."""
    rows_key = {"ingest": "downloaded", "embed": "rows_embedded"}
    runs = [
        {
            "stage": stage,
            "run_id": record["run_id"],
            "rows": record.get(rows_key[stage], 0),
            "failed": record.get("failed", {}),
            "wall_s": record.get("wall_s", 0.0),
            "log": storage.exists(path.with_suffix(".log")),
        }
        for stage, path, record in catalog.run_records(root)
    ]
    return sorted(runs, key=lambda r: r["run_id"], reverse=True)[:limit]


def status(root: Path) -> dict:
    return {
        "data_dir": str(root),
        "bronze": bronze_status(root),
        "silver": silver_status(root),
        "gold": gold_status(root),
        "debris": debris_status(root),
        "runs": recent_runs(root),
    }
