"""Ingest rate: bare img2dataset against the whole `rayclip ingest`, on the same loopback site.

    .venv/bin/python benchmarks/bench_ingest.py [--images 4096] [--processes 1] [--threads 16] [--repeats 2]
                                                [--store s3://bucket/prefix]

A site of distinct JPEGs (rendered scenes, 256–512 px; beyond --distinct renders, copies made distinct
by a trailing byte after the end-of-image marker, which every decoder ignores) is served by
`python -m http.server` in its own process, so the server takes no CPU from the measured process.
  bare     img2dataset.download with exactly the arguments rayclip passes (same output format, shard
           size, processes and threads) into a fresh folder: the download and img2dataset's own decode,
           its processes started as img2dataset alone starts them (from this script: with torch);
  rayclip  ingest.ingest_metadata into a fresh data root: the same download, plus the decode check,
           hashing, the object writes and the manifest commit, overlapped with the download.
Both write under --store (default: a local temporary folder; an s3:// prefix works too). Each is run
--repeats times, alternating; the best run of each is reported, with the ratio rayclip / bare.
The CPU-seconds of img2dataset's processes are reported for each side too: rayclip's start from its
light main module (stages/ingest/spawned.py), without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from rayclip import synthetic
from rayclip.stages import ingest
from rayclip.stages.ingest import download
from rayclip.store import storage


def make_site(folder: Path, images: int, distinct: int) -> list[str]:
    """`images` distinct files under folder (renders, then altered copies); returns their names."""
    table = synthetic.write_images(folder, min(images, distinct), seed=11)
    rendered = table.column("filename").to_pylist()
    names = list(rendered)
    for i in range(len(rendered), images):
        name = f"copy_{i:07d}.jpg"
        (folder / name).write_bytes((folder / rendered[i % len(rendered)]).read_bytes() + i.to_bytes(4, "big"))
        names.append(name)
    return names


@contextlib.contextmanager
def http_server(folder: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def children_cpu() -> float:
    """CPU-seconds of this process's finished children (img2dataset's spawned processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_bare(urls: pa.Table, store: storage.Location, args) -> float:
    """Seconds for img2dataset alone, called as ingest calls it."""
    work = store / f"bare-{uuid.uuid4().hex[:8]}"
    with storage.open_output(work / "input.parquet") as f:
        pq.write_table(urls, f)
    shard_rows = download._shard_rows(urls.num_rows, download._workers("multiprocessing", args.processes))
    started = time.perf_counter()
    # Its processes started from this script's main module, as img2dataset alone starts them.
    with mock.patch.object(download, "_spawned_from_ours", contextlib.nullcontext):
        download._img2dataset(
            work / "input.parquet",
            work / "out",
            "multiprocessing",
            shard_rows,
            processes_count=args.processes,
            thread_count=args.threads,
            timeout=10,
            retries=0,
        )
    seconds = time.perf_counter() - started
    storage.delete(work)
    return seconds


def run_rayclip(metadata: Path, store: storage.Location, args) -> tuple[float, ingest.IngestReport]:
    root = store / f"rayclip-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    report = ingest.ingest_metadata(root, metadata, processes=args.processes, threads=args.threads)
    seconds = time.perf_counter() - started
    storage.delete(root)
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--distinct", type=int, default=512, help="rendered scenes; the rest are altered copies")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--store", default=None, help="where both write (default: a local temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        names = make_site(tmp / "site", args.images, args.distinct)
        store = storage.data_root(args.store or tmp / "store")
        with http_server(tmp / "site") as base:
            urls = pa.table({"url": [f"{base}/{n}" for n in names], "caption": names})
            metadata = tmp / "meta.parquet"
            pq.write_table(urls.rename_columns(["URL", "TEXT"]), metadata)
            bare, whole, spawned_cpu = [], [], {"bare": [], "rayclip": []}
            for _ in range(args.repeats):
                before = children_cpu()
                bare.append(run_bare(urls, store, args))
                spawned_cpu["bare"].append(children_cpu() - before)
                before = children_cpu()
                seconds, report = run_rayclip(metadata, store, args)
                spawned_cpu["rayclip"].append(children_cpu() - before)
                if report.stored != args.images:
                    raise SystemExit(f"rayclip stored {report.stored} of {args.images}: {report.failed}")
                whole.append(seconds)
    bare_rate, whole_rate = args.images / min(bare), args.images / min(whole)
    print(f"images {args.images}, processes {args.processes}, threads {args.threads}, store {storage.uri(store)}")
    print(f"bare img2dataset  {bare_rate:8.1f} img/s  (runs: {', '.join(f'{s:.1f} s' for s in bare)})")
    print(f"rayclip ingest    {whole_rate:8.1f} img/s  (runs: {', '.join(f'{s:.1f} s' for s in whole)})")
    print(f"ratio rayclip / bare: {whole_rate / bare_rate:.2f}  (goal >= 0.9)")
    bare_cpu, ours_cpu = min(spawned_cpu["bare"]), min(spawned_cpu["rayclip"])
    print(
        f"img2dataset's processes, CPU-s per run (least): bare {bare_cpu:.1f} (with torch), rayclip "
        f"{ours_cpu:.1f} (from its light main module), ratio {ours_cpu / bare_cpu:.2f}"
    )


if __name__ == "__main__":
    main()
