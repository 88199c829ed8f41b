"""Embedding throughput: bare open_clip loops vs the whole `rayclip embed` command, on the same images.

    .venv/bin/python benchmarks/bench_embed.py [--images 4096] [--batch-size 32] [--gpus-per-actor 0]

ViT-B-32 (random init: speed does not depend on the weights) on generated LAION-sized JPEGs
(256–640 px, photo-like noise so they compress like photos). Prints, in one run:
  (a) the bare fp32 loop (read + PIL decode + open_clip preprocess + encode_image): one process
      with all cores as torch threads, and the whole machine (one process per core, 1 thread each);
  (b) the whole-machine bare loop at the precision `auto` picks here;
  (c) `rayclip embed` as a user runs it (a fresh process: imports, Ray start, actors, Parquet, commit) at fp32;
  (d) the same at the default precision (auto);
  the ratios d/a and d/b; the machine's measured GEMM GFLOP/s at fp32 and bf16, ViT-B-32's FLOPs per
  image (torch's flop counter) and d as a fraction of that compute limit; the ceiling once each
  image's decode + preprocess (measured on one core) is added to the encoder at the GEMM rate, as
  a multiple of a; and for c and d the steady-state images/s (start-up excluded) with startup_s
  beside it.

With --gpus-per-actor the bare loops and the GEMM run on the GPU too (every bare process shares
GPU 0, each decoding on its own core), so each ratio still compares like with like.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rayclip import images, model, synthetic
from rayclip.stages import ingest
from rayclip.store import layout

MODEL = "ViT-B-32"
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}  # a GPU needs larger products to be kept busy


def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i, scene in enumerate(synthetic.random_scenes(n, rng)):
        side = int(rng.integers(256, 641))
        pixels = np.asarray(synthetic.render(scene, side, rng), dtype=np.int16)
        noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)  # photo-like entropy
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(synthetic.jpeg_bytes(Image.fromarray(noisy)))
        paths.append(path)
    return paths


def bare_worker(
    paths: list[Path], batch_size: int, threads: int, device: str, precision: str, barrier, results
) -> None:
    """Load the model, wait for the others, then read + decode + preprocess + encode serially."""
    clip = model.load_model(model.resolve(MODEL, "none"), device=device, threads=threads, precision=precision)
    clip.encode_images([images.decode_image(paths[0].read_bytes())])  # warm: first call allocates
    barrier.wait()
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        clip.encode_images([images.decode_image(p.read_bytes()) for p in paths[i : i + batch_size]])
    results.put(time.perf_counter() - started)


def bare_loop(paths: list[Path], batch_size: int, processes: int, threads: int, device: str, precision: str) -> float:
    """images/s of `processes` bare loops side by side (spawned, the images split between them)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    shares = [paths[i::processes] for i in range(processes)]
    workers = [
        ctx.Process(target=bare_worker, args=(share, batch_size, threads, device, precision, barrier, results))
        for share in shares
    ]
    for w in workers:
        w.start()
    slowest = max(results.get(timeout=3600) for _ in workers)
    for w in workers:
        w.join()
    return len(paths) / slowest


def rayclip_embed(root: Path, precision: str, batch_size: int | None, gpus_per_actor: float) -> tuple[float, dict]:
    """The whole CLI command in a fresh process: (images/s over its wall time, its run record)."""
    version = f"bench_{precision}"
    command = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(root), "--model", MODEL]
    command += ["--pretrained", "none", "--precision", precision, "--model-version", version]
    command += ["--batch-size", str(batch_size)] if batch_size else []
    command += ["--gpus-per-actor", str(gpus_per_actor)] if gpus_per_actor else []
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"RAY_ADDRESS": ""})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"rayclip embed --precision {precision} exited {done.returncode}:\n{done.stderr[-4000:]}")
    runs = [json.loads(p.read_text()) for p in layout.embed_runs_dir(root).glob("*.json")]
    run = next(r for r in runs if r["model_version"] == version and r["rows_embedded"])
    return run["rows_embedded"] / wall, run


def gemm_gflops(dtype_name: str, device: str, seconds: float = 3.0) -> float:
    """Sustained matrix-multiply rate with every core (or the GPU), the ceiling any encoder can reach here."""
    import torch

    size = GEMM_SIZE[device]
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name])
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    wait = torch.cuda.synchronize if device == "cuda" else lambda: None  # GPU products run asynchronously
    a @ b
    wait()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        wait()
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def decode_seconds(paths: list[Path], count: int = 256) -> float:
    """CPU seconds one core spends per image on read + PIL decode + open_clip preprocess, which no
    precision speeds up: what the encoder's compute limit leaves out."""
    import torch

    torch.set_num_threads(1)
    clip = model.load_model(model.resolve(MODEL, "none"), precision="fp32")
    sample = paths[:count]
    started = time.process_time()
    for p in sample:
        clip.preprocess_images([images.decode_image(p.read_bytes())])
    return (time.process_time() - started) / len(sample)


def flops_per_image() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    clip = model.load_model(model.resolve(MODEL, "none"), precision="fp32")
    # With autograd on: under no_grad attention takes a fused kernel the counter does not see.
    with FlopCounterMode(display=False) as counter:
        clip.model.encode_image(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32, help="the bare loops' batch (rayclip: its default)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="run (c) and (d) on GPUs")
    parser.add_argument("--parts", default="abcd", help="which of (a)-(d) to run, e.g. ad (ratios need a, b and d)")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    device = "cuda" if args.gpus_per_actor else "cpu"
    chosen = model.choose_precision("auto", device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        paths = make_images(Path(tmp) / "images", args.images)
        ingest.ingest_folder(root, Path(tmp) / "images")
        print(f"{args.images} JPEGs, 256-640 px; {MODEL} random init; {cpus} CPUs; {device}; auto picks {chosen} here")

        runs: dict[str, tuple[float, dict]] = {}
        a1 = a = b = float("nan")
        if "a" in args.parts:
            a1 = bare_loop(paths, args.batch_size, 1, cpus, device, "fp32")
            a = bare_loop(paths, args.batch_size, cpus, 1, device, "fp32")
            print(f"(a) bare fp32 loop on {device}, 1 process x {cpus} threads:          {a1:8.2f} images/s")
            print(f"(a) bare fp32 loop on {device}, {cpus} processes x 1 thread (baseline): {a:8.2f} images/s")
        if "b" in args.parts:
            b = bare_loop(paths, args.batch_size, cpus, 1, device, chosen)
            print(f"(b) bare {chosen} loop on {device}, {cpus} processes x 1 thread:           {b:8.2f} images/s")
        commands = (("c", "(c) rayclip embed --precision fp32", "fp32"), ("d", "(d) rayclip embed", "auto"))
        for part, label, precision in commands:
            if part not in args.parts:
                continue
            whole, run = runs[part] = rayclip_embed(root, precision, None, args.gpus_per_actor)
            print(
                f"{label}: {whole:8.2f} images/s whole command; steady {run['steady_images_per_s']} images/s "
                f"after startup_s {run['startup_s']} (actors {run['actors']} x {run['torch_threads']} threads, "
                f"{run.get('decode_threads', 1)} decoding, "
                f"batch {run['batch_size']}, {run['precision']} on {run['device']}; decode {run['decode_s']} s, "
                f"encode {run['encode_s']} s, write {run['write_s']} s)"
            )
        if "d" not in runs:
            return
        d, run_d = runs["d"]
        steady = run_d["steady_images_per_s"]
        print(f"d/a = {d / a:.2f} whole command, {steady / a:.2f} steady")
        print(f"d/a(1 process) = {d / a1:.2f} whole command, {steady / a1:.2f} steady")
        print(f"d/b = {d / b:.2f} whole command, {steady / b:.2f} steady")

        flops = flops_per_image()
        gemm = {p: gemm_gflops(p, device) for p in dict.fromkeys(["fp32", chosen])}
        limit = gemm[run_d["precision"]] * 1e9 / flops if run_d["precision"] in gemm else float("nan")
        print(f"{MODEL} encode_image: {flops / 1e9:.2f} GFLOP per image (torch.utils.flop_counter)")
        print(
            "GEMM "
            + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in gemm.items())
            + f" ({GEMM_SIZE[device]}^2 on {device})"
        )
        print(f"compute limit at {run_d['precision']}: {limit:.1f} images/s; d steady is {steady / limit:.0%} of it")
        # Every image is also decoded and preprocessed on some core: with the encoder at the GEMM
        # rate on every core, a machine of `cpus` cores still spends decode/cpus seconds per image.
        decode = decode_seconds(paths)
        ceiling = 1 / (1 / limit + decode / cpus)
        print(
            f"decode + preprocess: {decode * 1000:.1f} ms of one core per image; ceiling with the encoder at the "
            f"GEMM rate: {ceiling:.1f} images/s = {ceiling / a:.2f}x a, {ceiling / a1:.2f}x a(1 process)"
        )


if __name__ == "__main__":
    main()
