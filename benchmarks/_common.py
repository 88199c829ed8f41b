"""Helpers shared by the benchmarks (not part of the package)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rayclip import embed, index, layout
from rayclip.model import ModelSpec


def random_silver(root: Path, spec: ModelSpec, n: int, dim: int, seed: int = 0) -> None:
    """n random unit vectors filed as silver for spec, in files of 50k rows."""
    rng = np.random.default_rng(seed)
    folder = layout.silver_partition(root, spec.model_version, "2026-01-01")
    folder.mkdir(parents=True, exist_ok=True)
    layout.write_json_atomic(layout.silver_model_file(root, spec.model_version), spec.to_dict())
    for start in range(0, n, 50_000):
        count = min(50_000, n - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"{i:064x}" for i in range(start, start + count)]
        pq.write_table(embed.silver_table(ids, vectors), folder / f"part-{start:09d}.parquet")


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
