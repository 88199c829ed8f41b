"""Gold builds at scale: flat vs --index-type auto over clustered 512-d vectors.

The vectors are a Gaussian mixture (1,000 unit cluster centres plus noise whose spectrum decays
after a random rotation; uniform noise would make any ANN index look worse than on real data),
written as silver Parquet files in seeded chunks, so a 10M set never sits in memory. Each build
runs in its own process, so its peak RSS is its own. Prints, per size and index: build time,
peak RSS, index bytes (and the share of flat's), recall@10 against exact search on 1,000
held-out vectors (measured by the build itself), one-query p50/p99 through the Searcher (FAISS +
mapping join), and the 1-minute load average as the timing ended (timings under load are not
comparable). Then, at sizes up to --incremental-max, a day of 1% new rows: incremental vs full.

How hard the mixture is (1M, 1,000 held-out queries, medians): cosine to the 1st / 10th / 100th
neighbour 0.664 / 0.620 / 0.553, to a random vector 0.00; the 11th neighbour is 0.19% farther
than the 10th; TwoNN intrinsic dimension 51. Each cluster is one Gaussian blob of ~1,000 points,
with no finer structure (near-duplicates, sub-topics), so its neighbours lie in a thin shell.

    python benchmarks/bench_index.py                      # 1M and 10M (hours on 2 cores, ~25 GB disk)
    python benchmarks/bench_index.py --sizes 100000       # a quick check
    python benchmarks/bench_index.py --sizes 1000000 --index-types IVF4096_HNSW32,SQ6 auto   # compare
    python benchmarks/bench_index.py --sizes 10000000 --data-dir big/   # silver kept: a rerun reuses it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_mixture_arguments, mixture_chunk

from rayclip.store import catalog, layout, storage

MODEL_VERSION = "bench_vectors"
GOALS_1M = "goals at 1M: p50 <= 2 ms, p99 <= 10 ms, recall@10 >= 0.95, index <= 1/4 of flat; at 10M recall >= 0.90"


def write_silver(root: Path, day: str, first: int, count: int, args) -> bool:
    """Silver of `count` vectors with media_ids first…first+count, chunk by chunk, committed as one
    run. A day already committed (a rerun over the same --data-dir) is kept: False. A killed
    write left no commit record, so it is written again (its files are debris the build ignores)."""
    from rayclip.model import ModelSpec
    from rayclip.store import silver

    if any(commit["dt"] == day for commit in catalog.silver_commits(root, MODEL_VERSION)):
        return False

    spec = ModelSpec("ViT-B-32", "none", version=MODEL_VERSION)
    silver.record_model(root, MODEL_VERSION, spec.to_dict())

    def chunks():
        for start in range(first, first + count, args.chunk):
            rows = min(args.chunk, first + count - start)
            vectors = mixture_chunk(start, rows, args.dim, args.clusters, args.seed)
            yield silver.embeddings_table([f"{i:064x}" for i in range(start, start + rows)], vectors)

    silver.write_run(root, MODEL_VERSION, day, chunks())
    return True


def drop_day(root: Path, day: str) -> None:
    """Remove a day of silver with its commit records, so a rerun starts from the first day alone."""
    for commit in catalog.silver_commits(root, MODEL_VERSION):
        if commit["dt"] == day:
            storage.delete(layout.silver_commit_file(root, MODEL_VERSION, commit["run_id"]))
    shutil.rmtree(layout.silver_partition(root, MODEL_VERSION, day))


def one_build(root: Path, index_type: str, retrain: bool, args) -> dict:
    """Runs in a child process: build, then time one-query searches through the Searcher."""
    from rayclip.ann import choice as index_choice
    from rayclip.query.builds import load_build
    from rayclip.query.searcher import Searcher
    from rayclip.stages import index
    from rayclip.store import catalog

    if args.flat_below is not None:
        index_choice.FLAT_BELOW = args.flat_below
    if args.hnsw_below is not None:
        index_choice.HNSW_BELOW = args.hnsw_below
    started = time.perf_counter()
    report = index.build(
        root,
        MODEL_VERSION,
        index_type=index_type,
        max_index_memory=args.max_index_memory,
        target_recall=args.target_recall,
        retrain=retrain,
    )
    build_s = time.perf_counter() - started
    info = json.loads((Path(report.path) / "build.json").read_text())
    searcher = Searcher(root, MODEL_VERSION, None, load_build(root, MODEL_VERSION, report.build_id))
    queries = mixture_chunk(10**12, args.queries, args.dim, args.clusters, args.seed)  # not in the index
    times = []
    for query in queries:
        t = time.perf_counter()
        searcher.search_vectors(query[None], 10)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "index_type": info["index_type"],
        "build_s": round(build_s, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "index_bytes": info["index_bytes"],
        "recall_at_10": catalog.BuildInfo.from_dict(info).recall_at_10,  # 1.0 for flat: exact, not measured
        "params": info["search_params"],
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "base_build": info["base_build"],
        "load": round(os.getloadavg()[0], 1),  # 1-minute load average as the timing ended
    }


def run_child(root: Path, index_type: str, retrain: bool, args) -> dict:
    command = [sys.executable, __file__, "--child", str(root), index_type, str(int(retrain))] + args.passthrough
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def show(size: int, label: str, row: dict, flat_bytes: int) -> None:
    print(
        f"{size:>11,} {label:<12} {row['index_type']:<28} build {row['build_s']:>8.1f} s  "
        f"peak {row['peak_rss_gib']:>6.2f} GiB  index {row['index_bytes'] / 2**20:>9.1f} MiB "
        f"({row['index_bytes'] / flat_bytes:.2f} of flat)  recall@10 {row['recall_at_10']:.3f}  "
        f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  load {row['load']:.1f}  {row['params']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mixture_arguments(parser)
    parser.add_argument("--queries", type=int, default=1000, help="one-query searches timed per build")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--max-index-memory", default="4G")
    parser.add_argument("--flat-max", type=int, default=2_000_000, help="skip flat above this many vectors")
    parser.add_argument("--incremental-max", type=int, default=1_000_000, help="incremental run up to this size")
    parser.add_argument("--flat-below", type=int, default=None, help="override auto's flat threshold (checks)")
    parser.add_argument("--hnsw-below", type=int, default=None, help="override auto's HNSW threshold (checks)")
    parser.add_argument(
        "--index-types", nargs="+", default=["auto"], help="built after flat at each size (auto, or factory strings)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="where silver and gold go, kept for a rerun to reuse (default: a temp folder)"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, index_type, retrain = args.child
        print(json.dumps(one_build(Path(root), index_type, retrain == "1", args)))
        return
    args.passthrough = _options_only(sys.argv[1:])
    print(f"{args.dim}-d Gaussian mixture, {args.clusters} clusters, seed {args.seed}; {GOALS_1M}", flush=True)
    with contextlib.ExitStack() as stack:
        top = Path(args.data_dir) if args.data_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for size in args.sizes:
            root = top / f"n{size}"
            started = time.perf_counter()
            if write_silver(root, "2026-01-01", 0, size, args):
                print(f"{size:>11,} vectors written as silver in {time.perf_counter() - started:.1f} s", flush=True)
            else:
                print(f"{size:>11,} vectors of silver kept from an earlier run in {root}", flush=True)
            flat_bytes = size * args.dim * 4
            if size <= args.flat_max:
                show(size, "flat", run_child(root, "flat", True, args), flat_bytes)
            else:
                print(f"{size:>11,} flat         skipped: {flat_bytes / 2**30:.1f} GiB of vectors", flush=True)
            for index_type in sorted(args.index_types, key=lambda name: name == "auto"):  # auto last: CURRENT
                show(size, index_type[:12], run_child(root, index_type, True, args), flat_bytes)
            if size <= args.incremental_max and "auto" in args.index_types:
                write_silver(root, "2026-01-02", size, max(1, size // 100), args)
                incremental = run_child(root, "auto", False, args)
                show(size, "auto +1% inc", incremental, flat_bytes)
                retrained = run_child(root, "auto", True, args)
                show(size, "auto +1% full", retrained, flat_bytes)
                print(
                    f"{size:>11,} incremental build {incremental['build_s']:.1f} s "
                    f"vs full {retrained['build_s']:.1f} s "
                    f"({retrained['build_s'] / max(incremental['build_s'], 1e-9):.1f}x); "
                    f"recall {incremental['recall_at_10']:.3f} vs {retrained['recall_at_10']:.3f}",
                    flush=True,
                )
                drop_day(root, "2026-01-02")  # a rerun over the same --data-dir starts from the same silver


def _options_only(argv: list[str]) -> list[str]:
    """The options a child needs (everything but --sizes and its values)."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == "--sizes"
        if not skipping:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
