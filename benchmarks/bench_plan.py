"""The embed planner at scale: plan time and the driver's peak RSS for synthetic manifests.

    .venv/bin/python benchmarks/bench_plan.py [--rows 500000 1000000 10000000] [--duplicates 0.1] [--embedded 0.5]

For each size: a local data root with a manifest of that many rows in parts of 1M rows (a share of
them repeat a media_id, as when one image has several URLs) and committed silver for a share of the
unique media_ids (4-d vectors: the planner reads only media_id). Then, in a fresh process so that its
peak RSS is the planner's own, Ray starts with the machine's CPUs and embed.plan_work plans the run
(read manifest and silver ids, group by media_id, drop the embedded). Prints, per size: rows planned
(checked against what the generator knows), which planner ran (in the driver up to
embed.DRIVER_PLAN_ROWS manifest + silver rows, else streaming), plan seconds, the driver's RSS after ray.init (Ray's own
floor) and its peak RSS over the whole plan, against the goal of < 1 GB at 10M rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayclip.stages import embed
from rayclip.store import catalog, layout, silver

PART_ROWS = 1_000_000
MODEL_VERSION = "bench_plan"
GOAL_10M_BYTES = 1 << 30


def ids(numbers: np.ndarray) -> pa.Array:
    """sha256-shaped media_ids (64 hex digits) for these numbers."""
    return pa.array([f"{n:064x}" for n in numbers.tolist()], pa.string())


def write_root(root: Path, rows: int, duplicates: float, embedded: float) -> int:
    """Manifest parts and committed silver; returns how many media_ids the plan must hold."""
    unique = max(1, int(rows * (1 - duplicates)))
    rng = np.random.default_rng(0)
    run_id = layout.new_run_id()
    for part, start in enumerate(range(0, rows, PART_ROWS)):
        count = min(PART_ROWS, rows - start)
        numbers = np.arange(start, start + count) % unique  # rows past `unique` repeat earlier ids
        media_id = ids(numbers)
        paths = pa.array([layout.object_relpath(m, "jpg") for m in media_id.to_pylist()], pa.string())
        columns = {"media_id": media_id, "path": paths}
        table = pa.table(
            {f.name: columns.get(f.name, pa.nulls(count, f.type)) for f in catalog.MANIFEST_SCHEMA},
            schema=catalog.MANIFEST_SCHEMA,
        )
        catalog.write_manifest_part(root, run_id, part, table.take(rng.permutation(count)))
    done = int(unique * embedded)
    chunks = (
        silver.embeddings_table(
            ids(np.arange(s, min(s + PART_ROWS, done))).to_pylist(), _unit(min(PART_ROWS, done - s))
        )
        for s in range(0, done, PART_ROWS)
    )
    silver.write_run(root, MODEL_VERSION, "2026-01-01", chunks)
    return unique - done


def _unit(n: int) -> np.ndarray:
    return np.tile(np.array([[1, 0, 0, 0]], np.float32), (n, 1))


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: getrusage's ru_maxrss would carry over the parent's
    high-water mark across fork and exec, and the parent just generated the data)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def plan_only(root: Path) -> dict:
    """In this (fresh) process: start Ray, plan, and report the planner's own figures."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    after_init = peak_rss()
    started = time.perf_counter()
    rows = embed.plan_work(root, MODEL_VERSION).count()
    plan_s = time.perf_counter() - started
    peak = peak_rss()
    ray.shutdown()
    in_driver = embed.plans_in_driver(catalog.manifest_parts(root), catalog.silver_files(root, MODEL_VERSION))
    return {
        "rows_planned": rows,
        "planner": "driver" if in_driver else "streaming",
        "plan_s": round(plan_s, 2),
        "rss_after_init": after_init,
        "peak_rss": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000, 1_000_000, 10_000_000])
    parser.add_argument("--duplicates", type=float, default=0.1, help="share of manifest rows repeating a media_id")
    parser.add_argument("--embedded", type=float, default=0.5, help="share of unique media_ids already in silver")
    parser.add_argument("--plan-only", type=Path, help=argparse.SUPPRESS)  # the measured child process
    args = parser.parse_args()
    if args.plan_only:
        print(json.dumps(plan_only(args.plan_only)))
        return

    mb = 1 << 20
    header = f"{'rows':>12} {'planned':>12} {'planner':>10} {'plan s':>8} {'RSS after init MB':>18} {'peak RSS MB':>12}"
    print(f"{header}  goal")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            expected = write_root(root, rows, args.duplicates, args.embedded)
            child = [sys.executable, __file__, "--plan-only", str(root)]
            done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        out = json.loads(done.stdout.splitlines()[-1])
        if out["rows_planned"] != expected:
            raise SystemExit(f"planned {out['rows_planned']} rows, expected {expected}")
        goal = "< 1 GB at 10M: " + ("met" if out["peak_rss"] < GOAL_10M_BYTES else "NOT met") if rows >= 10**7 else ""
        print(
            f"{rows:>12,} {out['rows_planned']:>12,} {out['planner']:>10} {out['plan_s']:>8} "
            f"{out['rss_after_init'] / mb:>18.0f} {out['peak_rss'] / mb:>12.0f}  {goal}"
        )


if __name__ == "__main__":
    main()
