"""Gold layer: deduplicated silver vectors → FAISS index + mapping, published atomically.

Two passes over the silver files keep one copy of the vectors in memory (the index itself):
the first reads only (media_id, embedded_at) to choose the newest row per media_id, the second
streams each file's chosen vectors into the index. faiss_id i is the i-th vector added, and
mapping.parquet row i says which media_id it is. A build is written in a hidden folder, checked,
renamed into builds/<build_id>/, and only then named in CURRENT (itself replaced by a rename).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .errors import UserError
from .ingest import read_manifest
from .progress import Progress

NORM_TOLERANCE = 1e-3
TRAIN_SAMPLE = 100_000  # vectors used to train an index type that needs training (IVF, PQ)


@dataclasses.dataclass
class BuildReport:
    build_id: str
    model_version: str
    count: int
    dim: int
    index_type: str
    duplicates_dropped: int
    source_partitions: list[str]
    timings: dict[str, float]
    path: str


def pick_model_version(root: Path, asked: str | None, available: list[str], layer: str) -> str:
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


def _choose_rows(files: list[Path]) -> tuple[pa.Table, int]:
    """Per media_id, the (file, row) of its newest embedding, in file-then-row order; and rows dropped."""
    parts = []
    for file_idx, f in enumerate(files):
        t = pq.read_table(f, columns=["media_id", "embedded_at"])
        parts.append(
            t.append_column("file_idx", pa.array(np.full(t.num_rows, file_idx, np.int32))).append_column(
                "row_idx", pa.array(np.arange(t.num_rows, dtype=np.int64))
            )
        )
    rows = pa.concat_tables(parts).sort_by(
        [("media_id", "ascending"), ("embedded_at", "descending"), ("file_idx", "descending")]
    )
    ids = rows.column("media_id").to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    chosen = rows.filter(pa.array(first)).sort_by([("file_idx", "ascending"), ("row_idx", "ascending")])
    return chosen, rows.num_rows - chosen.num_rows


def _vectors(f: Path, rows: np.ndarray) -> np.ndarray:
    column = pq.read_table(f, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[rows]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _check_vectors(vectors: np.ndarray, f: Path) -> None:
    if not np.isfinite(vectors).all():
        raise UserError(f"silver file {f.name} holds NaN or infinite vectors; re-embed with --force")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise UserError(f"silver file {f.name} holds vectors that are not L2-normalised; re-embed with --force")


def _training_sample(files: list[Path], file_idx: np.ndarray, row_idx: np.ndarray) -> np.ndarray:
    """Up to TRAIN_SAMPLE of the chosen vectors, drawn at random (seeded), for IVF/PQ training."""
    picked = np.random.default_rng(0).permutation(len(row_idx))[:TRAIN_SAMPLE]
    return np.concatenate([_vectors(f, np.sort(row_idx[picked][file_idx[picked] == i])) for i, f in enumerate(files)])


def _new_index(index_type: str, dim: int):
    import faiss

    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UserError(
            f"unknown --index-type {index_type!r}; use flat or a FAISS factory string (HNSW32, IVF1024,Flat)"
        ) from None


def _sources(root: Path) -> pa.Table:
    """One row per media_id from the manifest: its first (path, url, caption) and how many rows name it."""
    manifest = read_manifest(root, ["media_id", "path", "url", "caption", "ingested_at"]).sort_by("ingested_at")
    return (
        manifest.group_by("media_id", use_threads=False)
        .aggregate([("path", "first"), ("url", "first"), ("caption", "first"), ("url", "count")])
        .rename_columns(["media_id", "path", "url", "caption", "source_count"])
    )


def build(
    root: Path,
    model_version: str | None = None,
    day: str | None = None,
    index_type: str = "flat",
    progress: Progress | None = None,
) -> BuildReport:
    """Build and publish a new gold build; returns what was published. progress counts silver files added."""
    import faiss

    started = time.monotonic()
    model_version = pick_model_version(root, model_version, layout.silver_model_versions(root), "embeddings")
    files = layout.silver_files(root, model_version, day)
    if not files:
        raise UserError(f"no silver files for {model_version}{' on ' + day if day else ''}; run `rayclip embed`")
    spec_file = layout.silver_model_file(root, model_version)
    if not spec_file.is_file():
        raise UserError(
            f"silver for {model_version} does not say which model made it; re-embed with `rayclip embed --force`"
        )
    chosen, dropped = _choose_rows(files)
    file_idx = chosen.column("file_idx").to_numpy()
    row_idx = chosen.column("row_idx").to_numpy()
    read_s = time.monotonic() - started

    dim = pq.read_schema(files[0]).field("embedding").type.list_size
    index = _new_index(index_type, dim)
    if not index.is_trained:
        index.train(_training_sample(files, file_idx, row_idx))
    for i, f in enumerate(files):
        vectors = _vectors(f, row_idx[file_idx == i])
        _check_vectors(vectors, f)
        index.add(vectors)
        if progress:
            progress(i + 1, len(files))
    add_s = time.monotonic() - started - read_s

    media_ids = chosen.column("media_id")
    mapping = (
        pa.table({"faiss_id": pa.array(np.arange(len(media_ids), dtype=np.int64)), "media_id": media_ids})
        .join(_sources(root), "media_id", join_type="left outer")
        .sort_by("faiss_id")
    )
    unique = len(pc.unique(media_ids))
    if not index.ntotal == mapping.num_rows == unique:
        raise UserError(
            f"refusing to publish: index has {index.ntotal} vectors, mapping {mapping.num_rows}, unique ids {unique}"
        )

    build_id = layout.new_run_id()
    partitions = sorted({f.parent.name for f in files})
    info = {
        "build_id": build_id,
        "model_version": model_version,
        "model": json.loads(spec_file.read_text()),
        "dim": dim,
        "metric": "inner_product (cosine on L2-normalised vectors)",
        "index_type": index_type,
        "count": int(index.ntotal),
        "duplicates_dropped": dropped,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_partitions": partitions,
        "source_files": len(files),
    }
    final = layout.build_dir(root, model_version, build_id)
    staging = final.parent / f".{build_id}.tmp"
    staging.mkdir(parents=True)
    try:
        faiss.write_index(index, str(staging / "index.faiss"))
        pq.write_table(mapping, staging / "mapping.parquet")
        info["timings"] = {
            "read_s": round(read_s, 3),
            "add_s": round(add_s, 3),
            "total_s": round(time.monotonic() - started, 3),
        }
        layout.write_json_atomic(staging / "build.json", info)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    layout.write_atomic(layout.current_file(root, model_version), build_id + "\n")
    return BuildReport(
        build_id, model_version, info["count"], dim, index_type, dropped, partitions, info["timings"], str(final)
    )


def builds(root: Path, model_version: str) -> list[str]:
    folder = layout.builds_dir(root, model_version)
    return sorted(p.name for p in folder.iterdir() if (p / "build.json").is_file()) if folder.is_dir() else []


def current_build(root: Path, model_version: str) -> str | None:
    path = layout.current_file(root, model_version)
    return path.read_text().strip() if path.is_file() else None


def rollback(root: Path, model_version: str | None = None) -> tuple[str, str]:
    """Point CURRENT at the build before it; returns (from, to)."""
    model_version = pick_model_version(root, model_version, layout.gold_model_versions(root), "index")
    current = current_build(root, model_version)
    ids = builds(root, model_version)
    earlier = [b for b in ids if current is None or b < current]
    if not earlier:
        raise UserError(f"no build before {current} for {model_version}; nothing to roll back to")
    layout.write_atomic(layout.current_file(root, model_version), earlier[-1] + "\n")
    return current or "", earlier[-1]
