"""Shards in and out at scale: ingest WebDataset tars, export them again, ingest the export, with the
driver's peak memory at two sizes (it should stay flat as the rows grow).

    .venv/bin/python benchmarks/bench_export.py [--rows 20000] [--samples-per-shard 10000]

N tiny distinct JPEGs (one 8x8 render, each copy made distinct by 4 bytes after its end-of-image
marker, which every decoder ignores) are written as WebDataset tars into a local temporary folder.
Then, for rows/10 and rows, each in a fresh process so that its peak RSS is its own:
  ingest   ingest.ingest_webdataset of the tars into a fresh data root (decode check, sha256, objects, manifest);
  export   export.export of every manifest row (no query) as webdataset shards;
  re-ingest the export into another fresh root.
Printed: rows/s per step and the process's peak RSS (resource.getrusage) after imports and after each
step, then the ratio of the peaks. Everything is local files; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tars(folder: Path, rows: int, per_shard: int) -> None:
    """rows distinct samples ({key}.jpg, .txt, .json with a url) in tars of per_shard."""
    image, now = tiny_jpeg(), int(time.time())
    for shard, start in enumerate(range(0, rows, per_shard)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(start, min(rows, start + per_shard)):
                meta = json.dumps({"url": f"https://images.example.com/{i}.jpg"}).encode()
                for ext, data in (("jpg", image + i.to_bytes(4, "big")), ("txt", f"item {i}".encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size, info.mtime = len(data), now
                    tar.addfile(info, io.BytesIO(data))


def one_size(tars: Path, work: Path, per_shard: int) -> dict:
    """The three steps in this process; the rates and peaks."""
    from rayclip import export
    from rayclip.stages import ingest

    measured = {"imports_mib": round(peak_mib(), 1)}
    started = time.perf_counter()
    report = ingest.ingest_webdataset(work / "a", f"{tars}/*.tar")
    rows = report.downloaded
    measured |= {
        "rows": rows,
        "ingest_rows_s": round(rows / (time.perf_counter() - started)),
        "ingest_mib": round(peak_mib(), 1),
    }
    started = time.perf_counter()
    out = export.export(work / "a", work / "out", samples_per_shard=per_shard)
    seconds = time.perf_counter() - started
    measured |= {"export_rows_s": round(out.exported / seconds), "export_mib": round(peak_mib(), 1)}
    started = time.perf_counter()
    again = ingest.ingest_webdataset(work / "b", f"{work}/out/*.tar")
    seconds = time.perf_counter() - started
    assert again.downloaded == out.exported == rows, (again.downloaded, out.exported, rows)
    return measured | {"reingest_rows_s": round(rows / seconds), "reingest_mib": round(peak_mib(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="the larger size (the smaller is rows/10)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--one", nargs=2, metavar=("TARS", "WORK"), help=argparse.SUPPRESS)  # a child's size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(Path(args.one[0]), Path(args.one[1]), args.samples_per_shard)))
        return
    results = []
    for rows in (max(1, args.rows // 10), args.rows):
        with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
            tars, work = Path(folder) / "tars", Path(folder) / "work"
            tars.mkdir()
            write_tars(tars, rows, args.samples_per_shard)
            command = [sys.executable, __file__, "--samples-per-shard", str(args.samples_per_shard)]
            done = subprocess.run([*command, "--one", str(tars), str(work)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    small, large = results
    print(f"rows {small['rows']} -> {large['rows']} ({large['rows'] / small['rows']:.0f}x)")
    for step in ("ingest", "export", "reingest"):
        rates = f"{small[f'{step}_rows_s']} -> {large[f'{step}_rows_s']} rows/s"
        print(f"{step:9s} {rates:28s} peak RSS {small[f'{step}_mib']:.0f} -> {large[f'{step}_mib']:.0f} MiB")
    print(f"peak RSS ratio large/small: {large['reingest_mib'] / small['reingest_mib']:.2f}")


if __name__ == "__main__":
    main()
