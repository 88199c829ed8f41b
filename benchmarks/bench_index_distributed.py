"""The gold build in parts: its steps as Ray tasks vs the same steps in one process, on the same silver.

bench_index.py's clustered 512-d vectors (the same generator, seed and silver files). Per size, two
full builds of the same index type, parts and form, each in its own process: `--parallel local` (every
step inline: the single-process build) and `--parallel ray` (a local Ray cluster on this machine's
cores, or the one $RAY_ADDRESS names). Prints each build's wall time and the ratio, the driver's peak
RSS (the building process), every task's peak RSS by step (from build.json), recall@10 against exact
search on 1,000 held-out vectors, and the 1-minute load average as the build ended.

    python benchmarks/bench_index_distributed.py --sizes 1000000
    python benchmarks/bench_index_distributed.py --sizes 10000000 --data-dir big/   # silver kept for reruns
    python benchmarks/bench_index_distributed.py --sizes 1000000 --on-disk          # or --shards 4
    python benchmarks/bench_index_distributed.py --sizes 200000 1000000 --only ray  # the driver's slope
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_mixture_arguments
from bench_index import MODEL_VERSION, write_silver


def one_build(root: Path, parallel: str, args) -> dict:
    """Runs in a child process: one full build; its wall time, this process's peak RSS, build.json."""
    from rayclip.stages import index
    from rayclip.store import catalog

    started = time.perf_counter()
    report = index.build(
        root,
        MODEL_VERSION,
        index_type=args.index_type,
        max_index_memory=args.max_index_memory,
        retrain=True,
        parallel=parallel,
        part_vectors=args.part_vectors,
        shards=args.shards,
        on_disk=args.on_disk,
    )
    wall_s = time.perf_counter() - started
    info = catalog.build_info(root, MODEL_VERSION, report.build_id)
    with contextlib.suppress(ImportError):
        import ray

        ray.shutdown()
    return {
        "wall_s": round(wall_s, 1),
        "driver_peak_gib": round(peak_rss_kib() / 2**20, 2),
        "index_type": info.index_type,
        "form": info.form,
        "steps": info.steps,
        "recall_at_10": info.recall_at_10,  # 1.0 for exact search (flat), which measures none
        "params": info.search_params,
        "index_bytes": info.index_bytes,
        "load": round(os.getloadavg()[0], 1),
    }


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM), in KiB. Not getrusage's ru_maxrss: a child started
    by vfork and exec (subprocess) inherits its parent's peak there, e.g. a parent that just wrote the
    silver."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def run_child(root: Path, parallel: str, args) -> dict:
    command = [sys.executable, __file__, "--child", str(root), parallel] + args.passthrough
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # the child's traceback or error line, not just its exit status
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {parallel} build failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(size: int, row: dict) -> None:
    steps = row["steps"]
    peaks = steps["task_peak_rss_mib"] or {}
    tasks = "  ".join(f"{step} {max(mib) / 1024:.2f} GiB (x{len(mib)})" for step, mib in peaks.items())
    print(
        f"{size:>11,} {steps['ran_on']:<5} {row['index_type']} ({row['form']}, {steps['parts']} parts, "
        f"{steps['nodes']} node(s))  wall {row['wall_s']:>8.1f} s  driver peak {row['driver_peak_gib']:.2f} GiB  "
        f"recall@10 {row['recall_at_10']:.3f} {row['params']}  index {row['index_bytes'] / 2**20:.0f} MiB  "
        f"load {row['load']:.1f}" + (f"\n{'':>12}task peaks: {tasks}" if tasks else ""),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mixture_arguments(parser)
    parser.add_argument("--index-type", default="auto")
    parser.add_argument("--max-index-memory", default="4G")
    parser.add_argument("--part-vectors", type=int, default=250_000, help="vectors per add task")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--on-disk", action="store_true")
    parser.add_argument("--data-dir", default=None, help="where silver and gold go, kept for a rerun to reuse")
    parser.add_argument("--only", choices=["local", "ray"], help="one of the two builds (the driver's slope)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, parallel = args.child
        print(json.dumps(one_build(Path(root), parallel, args)))
        return
    args.passthrough = [a for a in sys.argv[1:] if a not in {str(s) for s in args.sizes} and a != "--sizes"]
    print(f"{args.dim}-d Gaussian mixture, {args.clusters} clusters, seed {args.seed}; {os.cpu_count()} CPUs")
    with contextlib.ExitStack() as stack:
        top = Path(args.data_dir) if args.data_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for size in args.sizes:
            root = top / f"n{size}"
            started = time.perf_counter()
            if write_silver(root, "2026-01-01", 0, size, args):
                print(f"{size:>11,} vectors written as silver in {time.perf_counter() - started:.1f} s", flush=True)
            rows = {
                parallel: run_child(root, parallel, args)
                for parallel in ("local", "ray")
                if args.only in (None, parallel)
            }
            for row in rows.values():
                show(size, row)
            if args.only:
                continue
            local, distributed = rows["local"], rows["ray"]
            print(
                f"{size:>11,} distributed / single-process wall time: {distributed['wall_s'] / local['wall_s']:.2f}  "
                f"(driver peak {distributed['driver_peak_gib']:.2f} vs {local['driver_peak_gib']:.2f} GiB)",
                flush=True,
            )


if __name__ == "__main__":
    main()
