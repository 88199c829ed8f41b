"""Warm query latency (text encode + FAISS search + mapping join) and index build time.

    .venv/bin/python benchmarks/bench_search.py [--sizes 10000 100000] [--queries 200]

ViT-B-32 (random init: latency does not depend on the weights) over random unit vectors.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from _common import percentiles, random_silver, timed_build

from rayclip import Searcher, model

QUERIES = [
    "a dog running on grass",
    "a red car parked by the sea",
    "two people on a beach at sunset",
    "a bowl of fruit",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = model.resolve("ViT-B-32", "none")
    print(
        f"model {spec.name} ({spec.pretrained}), {args.queries} warm text queries per size, "
        f"torch threads {args.threads}"
    )
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            random_silver(root, spec, n, 512)
            report, build_s = timed_build(root)
            peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            searcher = Searcher.open(root, threads=args.threads)
            for q in QUERIES:
                searcher.search_text(q, k=10)  # warm up
            total, encode, search = [], [], []
            for i in range(args.queries):
                q = QUERIES[i % len(QUERIES)]
                t0 = time.perf_counter()
                vector = searcher.model.encode_texts([q])
                t1 = time.perf_counter()
                searcher.search_vectors(vector, k=10)
                t2 = time.perf_counter()
                total.append(t2 - t0)
                encode.append(t1 - t0)
                search.append(t2 - t1)
            print(
                f"N={n:>7}  build {build_s:6.2f} s ({report.count} vectors, peak RSS {peak_gib:.2f} GiB)  "
                f"query {percentiles(total)}  of which encode p50 {percentiles(encode)['p50_ms']} ms, "
                f"search+join p50 {percentiles(search)['p50_ms']} ms"
            )


if __name__ == "__main__":
    main()
