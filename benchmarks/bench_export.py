"""Shards in and out at scale: ingest WebDataset tars, export them again, ingest the export, with the
driver's peak memory at two sizes (it should stay flat as the rows grow).

    .venv/bin/python benchmarks/bench_export.py [--rows 20000] [--samples-per-shard 10000] [--steps ...]

N tiny distinct JPEGs (one 8x8 render, each copy made distinct by 4 bytes after its end-of-image
marker, which every decoder ignores) are written as WebDataset tars into a local temporary folder.
Then, for rows/10 and rows, each step in a fresh process so that its peak RSS is its own:
  ingest   ingest.ingest_webdataset of the tars into a fresh data root (decode check, sha256, objects, manifest);
  export   export.export of every manifest row (no query) as webdataset shards;
  re-ingest the export into another fresh root.
`--steps ingest export` leaves out the re-ingest (the same code as the ingest), for a run at 1M rows.
Printed: rows/s per step and the step's peak RSS (resource.getrusage; the imports alone reach about
90 MiB), and the ratio of the peaks at the two sizes. Everything is local files; nothing leaves the machine.
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

STEPS = ("ingest", "export", "reingest")


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


def step(name: str, tars: Path, work: Path, per_shard: int) -> dict:
    """One step, alone in this process: its rows, rows/s and peak RSS (the imports' peak too)."""
    from rayclip import export
    from rayclip.stages import ingest

    imports, started = peak_mib(), time.perf_counter()
    if name == "ingest":
        rows = ingest.ingest_webdataset(work / "a", f"{tars}/*.tar").admitted
    elif name == "export":
        rows = export.export(work / "a", work / "out", samples_per_shard=per_shard).exported
    else:
        rows = ingest.ingest_webdataset(work / "b", f"{work}/out/*.tar").admitted
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "rows_s": round(rows / seconds),
        "peak_mib": round(peak_mib(), 1),
        "imports_mib": round(imports, 1),
    }


def one_size(tars: Path, work: Path, per_shard: int, steps: list[str]) -> dict:
    """The steps (ingest, export, re-ingest), each in a fresh process so that each peak RSS is its own."""
    measured = {}
    for name in steps:
        command = [
            sys.executable,
            __file__,
            "--samples-per-shard",
            str(per_shard),
            "--step",
            name,
            str(tars),
            str(work),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        measured[name] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {m["rows"] for m in measured.values()}
    assert len(rows) == 1, measured  # every row went out and came back
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="the larger size (the smaller is rows/10)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="in this order")
    parser.add_argument("--step", nargs=3, metavar=("STEP", "TARS", "WORK"), help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.step:
        name, tars, work = args.step
        print(json.dumps(step(name, Path(tars), Path(work), args.samples_per_shard)))
        return
    results = []
    for rows in (max(1, args.rows // 10), args.rows):
        with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
            tars = Path(folder) / "tars"
            tars.mkdir()
            write_tars(tars, rows, args.samples_per_shard)
            results.append(one_size(tars, Path(folder) / "work", args.samples_per_shard, args.steps))
        print(json.dumps(results[-1]), flush=True)
    small, large = results
    print(f"rows {small['ingest']['rows']} -> {large['ingest']['rows']}, {args.samples_per_shard} per shard")
    for name in args.steps:
        rates = f"{small[name]['rows_s']} -> {large[name]['rows_s']} rows/s"
        peaks = f"{small[name]['peak_mib']:.0f} -> {large[name]['peak_mib']:.0f} MiB"
        ratio = large[name]["peak_mib"] / small[name]["peak_mib"]
        print(f"{name:9s} {rates:26s} peak RSS {peaks} (x{ratio:.2f})")


if __name__ == "__main__":
    main()
