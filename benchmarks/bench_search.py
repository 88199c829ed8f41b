"""Warm query latency (text encode + FAISS search + mapping join) and index build time.

    .venv/bin/python benchmarks/bench_search.py [--sizes 10000 100000] [--queries 200] [--precision auto]

ViT-B-32 (random init: latency does not depend on the weights) over clustered unit vectors (the
Gaussian mixture bench_index uses) filed under sha256-like ids, with a manifest that has paths,
URLs and captions (so the join is real).
Two kinds of warm query, each with p50/p99 and its encode / search / join split:
  new text      every query a text not seen before: the text tower runs each time;
  repeated text a few texts asked again and again: the encoder's LRU answers, no text tower.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from _common import percentiles, random_silver, timed_build

from rayclip import Searcher, model
from rayclip.options import PRECISIONS

QUERIES = [
    "a dog running on grass",
    "a red car parked by the sea",
    "two people on a beach at sunset",
    "a bowl of fruit",
]


def time_queries(searcher: Searcher, texts: list[str]) -> dict[str, dict]:
    """Per query: encode, FAISS search, join (search_vectors minus the bare FAISS search), total."""
    index = searcher.snapshot().knn.index  # the bare FAISS search, timed apart from the join
    times: dict[str, list[float]] = {"total": [], "encode": [], "search": [], "join": []}
    for text in texts:
        t0 = time.perf_counter()
        vector = searcher.model.encode_texts([text])
        t1 = time.perf_counter()
        searcher.search_vectors(vector, k=10)
        t2 = time.perf_counter()
        index.search(vector, 10)
        t3 = time.perf_counter()
        times["total"].append(t2 - t0)
        times["encode"].append(t1 - t0)
        times["search"].append(t3 - t2)
        times["join"].append(max(0.0, (t2 - t1) - (t3 - t2)))
    return {name: percentiles(samples) for name, samples in times.items()}


def show(label: str, stats: dict[str, dict]) -> str:
    total = stats["total"]
    split = ", ".join(f"{name} {stats[name]['p50_ms']}" for name in ("encode", "search", "join"))
    return f"{label}: p50 {total['p50_ms']} ms, p99 {total['p99_ms']} ms (p50 split, ms: {split})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    args = parser.parse_args()
    spec = model.resolve("ViT-B-32", "none")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            random_silver(root, spec, n, 512)
            report, build_s = timed_build(root)
            peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            searcher = Searcher.open(root, threads=args.threads, precision=args.precision)
            if n == args.sizes[0]:
                print(
                    f"model {spec.name} ({spec.pretrained}) at {searcher.model.precision}, torch threads "
                    f"{args.threads}, {args.queries} warm queries of each kind per size"
                )
            for q in QUERIES:
                searcher.search_text(q, k=10)  # warm up (and fill the LRU with the repeated texts)
            new = time_queries(searcher, [f"{QUERIES[i % len(QUERIES)]}, take {i}" for i in range(args.queries)])
            repeated = time_queries(searcher, [QUERIES[i % len(QUERIES)] for i in range(args.queries)])
            print(f"N={n:>7}  build {build_s:6.2f} s ({report.count} vectors, peak RSS {peak_gib:.2f} GiB)")
            print("    " + show("new text     ", new))
            print("    " + show("repeated text", repeated))


if __name__ == "__main__":
    main()
