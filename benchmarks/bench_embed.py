"""Embedding throughput: a bare single-process open_clip loop vs `rayclip embed` end to end.

    .venv/bin/python benchmarks/bench_embed.py [--images 1500] [--actors 2] [--batch-size 16]

Both decode + preprocess + encode the same JPEGs (256–640 px) with ViT-B-32, random init, on
all cores: (a) one process, torch threads = CPU count; (b) `rayclip embed` (Ray start, actors,
Parquet write and commit included). Prints images/s of each and the ratio b/a.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from rayclip import embed, ingest, model, synthetic


def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i, scene in enumerate(synthetic.random_scenes(n, rng)):
        side = int(rng.integers(256, 641))
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(synthetic.jpeg_bytes(synthetic.render(scene, side, rng)))
        paths.append(path)
    return paths


def bare_loop(paths: list[Path], spec: model.ModelSpec, batch_size: int, threads: int) -> float:
    clip = model.load_model(spec, threads=threads)
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [model.decode_image(p.read_bytes()) for p in paths[i : i + batch_size]]
        clip.encode_images(images)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    spec = model.resolve("ViT-B-32", "none")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        paths = make_images(Path(tmp) / "images", args.images)
        ingest.ingest_folder(root, Path(tmp) / "images")
        a = bare_loop(paths, spec, args.batch_size, threads=cpus)
        print(f"(a) bare open_clip loop, 1 process, {cpus} threads: {a:.2f} images/s")
        started = time.perf_counter()
        report = embed.embed(root, spec, actors=args.actors, batch_size=args.batch_size)
        b = report.rows_embedded / (time.perf_counter() - started)
        print(
            f"(b) rayclip embed, {args.actors} actors x {report.torch_threads} threads: {b:.2f} images/s end to end "
            f"(planning, Ray start, actors, Parquet write and commit); actors_used={report.actors_used} "
            f"tasks={report.tasks}"
        )
        print(f"images={args.images} batch_size={args.batch_size}  ratio b/a = {b / a:.3f}")


if __name__ == "__main__":
    main()
