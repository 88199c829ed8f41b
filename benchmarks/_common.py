"""Helpers shared by the benchmarks (not part of the package)."""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayclip.model import ModelSpec
from rayclip.stages import index
from rayclip.store import catalog, layout, silver


def add_mixture_arguments(parser) -> None:
    """The silver sizes and mixture of bench_index.py and bench_index_distributed.py (the same silver)."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=100_000, help="vectors per silver file")
    parser.add_argument("--seed", type=int, default=0)


def mixture_chunk(start: int, rows: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Rows [start, start+rows) of the seeded mixture; any chunk can be made alone."""
    base = np.random.default_rng(seed)
    centres = base.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5) * 0.45  # decaying spectrum
    rotation = np.linalg.qr(base.standard_normal((dim, dim)))[0].astype(np.float32)
    rng = np.random.default_rng([seed, start])
    noise = (rng.standard_normal((rows, dim), dtype=np.float32) * scales) @ rotation
    points = centres[rng.integers(0, clusters, rows)] + noise
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def random_silver(root: Path, spec: ModelSpec, n: int, dim: int, seed: int = 0) -> None:
    """n clustered unit vectors (mixture_chunk: uniform noise would make any approximate index look
    worse than on CLIP vectors) filed as silver for spec, in files of 50k rows, and a manifest naming
    them: sha256-like ids, paths, URLs and captions, so the mapping join costs what a real one does."""
    silver.record_model(root, spec.model_version, spec.to_dict())
    ids = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    chunks = (
        silver.embeddings_table(
            ids[start : start + 50_000], mixture_chunk(start, min(50_000, n - start), dim, 1000, seed)
        )
        for start in range(0, n, 50_000)
    )
    silver.write_run(root, spec.model_version, "2026-01-01", chunks)
    manifest = {
        "media_id": ids,
        "path": [layout.object_relpath(m, "jpg") for m in ids],
        "url": [f"https://images.example.com/{m[:2]}/{m}.jpg" for m in ids],
        "caption": [f"a photo of item {i}, number {i % 97} in a series of generated captions" for i in range(n)],
    }
    columns = {name: manifest.get(name, [None] * n) for name in catalog.MANIFEST_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=catalog.MANIFEST_SCHEMA)
    catalog.write_manifest_part(root, layout.new_run_id(), 0, table)


def timed_build(root: Path) -> tuple[index.BuildReport, float]:
    started = time.perf_counter()
    report = index.build(root)
    return report, time.perf_counter() - started


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }
