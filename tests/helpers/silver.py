"""Silver written directly (no Ray): made-up vectors filed under the reference model, for index tests."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayclip import model
from rayclip.store import catalog, layout, silver

REFERENCE_DIM = 128
FILLED_DAY = "2026-01-02"  # the silver partition fill() writes


@functools.cache
def reference_spec() -> model.ModelSpec:
    return model.resolve(None, model.REFERENCE_ALIAS)


def normalised(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int = REFERENCE_DIM, clusters: int = 32, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """A normalised Gaussian mixture: real embeddings cluster, uniform noise would not. The seed
    fixes the centres; another n gives other points around the same centres (fresh queries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * spread / np.sqrt(dim)
    return normalised(points)


def write_silver(root: Path, day: str, media_ids: list[str], vectors: np.ndarray) -> Path:
    """One committed silver file in dt=day, as the embed stage would leave it."""
    spec = reference_spec()
    silver.record_model(root, spec.model_version, spec.to_dict())
    record = silver.write_run(root, spec.model_version, day, [silver.embeddings_table(media_ids, normalised(vectors))])
    return layout.silver_model_dir(root, spec.model_version) / record["files"][0]["name"]


def media_ids(n: int, prefix: str = "") -> list[str]:
    """Distinct 64-hex media_ids (the contract's shape), stable for a given n and prefix."""
    import hashlib

    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def write_manifest(root: Path, ids: list[str], seed: int = 0) -> pa.Table:
    """A bronze manifest part naming these media_ids, with varied width, height, caption and source."""
    import datetime as dt

    rng = np.random.default_rng(seed)
    animals = ["dog", "cat", "bird", "fish"]
    n = len(ids)
    table = pa.table(
        {
            "media_id": ids,
            "path": [layout.object_relpath(m, "jpg") for m in ids],
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": [f"a {animals[i % 4]} number {i}" for i in range(n)],
            "width": rng.integers(64, 1024, n).astype(np.int32),
            "height": rng.integers(64, 1024, n).astype(np.int32),
            "format": ["jpeg"] * n,
            "size_bytes": rng.integers(1000, 90000, n),
            "source": [["metadata:a.parquet", "folder:b"][i % 2] for i in range(n)],
            "run_id": ["r"] * n,
            "ingested_at": [dt.datetime(2026, 1, 1 + i % 28, tzinfo=dt.timezone.utc) for i in range(n)],
        },
        schema=catalog.MANIFEST_SCHEMA,
    )
    catalog.write_manifest_part(root, layout.new_run_id(), seed, table)
    return table


def fill(root, rows: int, prefix: str = "") -> list[str]:
    """The same silver on any root (local or a store): `rows` made-up vectors around fixed centres in
    one committed file of FILLED_DAY, and a manifest part naming them. `prefix` gives other media_ids
    (and points); returns the media_ids."""
    ids = media_ids(rows, prefix)
    write_silver(root, FILLED_DAY, ids, clustered(rows, seed=len(prefix)))
    write_manifest(root, ids, seed=len(prefix))
    return ids
