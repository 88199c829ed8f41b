"""The driver's share of a distributed gold build at a size too large to build here: its memory over
every step that grows with the vectors, without the index work itself.

Runs, in this process as `rayclip index --parallel ray` does: the row choice (bucket and newest tasks
on a local Ray cluster), the seeded sample (tuning queries and training rows) and the row numbers of
every add and map task. Prints the driver's peak resident memory (VmHWM) and its growth per million
vectors. The tasks' own memory is theirs (bench_index_distributed.py prints it).

    python benchmarks/bench_index_driver.py --data-dir big/n10000000   # silver that bench_index wrote
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index import MODEL_VERSION

from rayclip.stages.index import full, parts, select
from rayclip.store import catalog, storage


def peak_kib(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--part-vectors", type=int, default=4_000_000)
    parser.add_argument("--nlist", type=int, default=8192)
    args = parser.parse_args()
    root = storage.data_root(args.data_dir)
    files = catalog.silver_files(root, MODEL_VERSION, None)
    started, base = time.perf_counter(), peak_kib("VmRSS")
    counts = [catalog.parquet_metadata(f).num_rows for f in files]
    runner = parts.Runner(True)
    with tempfile.TemporaryDirectory(prefix="rayclip-driver-") as folder:
        file_idx, row_idx, dropped = select.select(runner, Path(folder), files, counts)
    chosen = time.perf_counter() - started
    count = len(file_idx)
    queries, training = full.sample_positions(count, args.nlist, True)
    ranges = parts.part_ranges(count, args.part_vectors, "IVF")
    adds = [parts.rows_at(files, file_idx, row_idx, np.arange(first, first + n)) for first, n in ranges]
    maps = [parts.rows_at(files, file_idx, row_idx, np.arange(first, first + n)) for first, n in ranges]
    peak = peak_kib()
    print(
        f"{count:,} rows chosen of {sum(counts):,} ({dropped:,} dropped) in {chosen:.0f} s; {len(adds)} parts "
        f"({len(maps)} map tasks); driver: {base / 2**20:.2f} GiB at start, peak {peak / 2**20:.2f} GiB, "
        f"{(peak - base) / 2**20 / (count / 1e6):.3f} GiB per million vectors over its start"
    )
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
