"""Embedding throughput and start-up: bare open_clip loops vs the whole `rayclip embed` command, on the same images.

    .venv/bin/python benchmarks/bench_embed.py [--images 1024] [--parts fadn] [--gpus-per-actor 0]

ViT-B-32 (random init: speed does not depend on the weights) on generated LAION-sized JPEGs
(256–640 px, photo-like noise so they compress like photos), each with a distinct caption, ingested
from loopback as a LAION download is. Prints first the machine's ceiling: GEMM GFLOP/s at fp32 and at
the precision `auto` picks, ViT-B-32's FLOPs per image (torch's flop counter), the compute limit
that gives, each image's decode + preprocess on one core, and the ceiling once that decode is spread
over the cores; then the bound the steady rate is held to: the image tower alone (ready pixels,
every core, as many images as the runs encode), and with the decode shared over the cores; with
part (o), the same for the tower on OpenVINO; and, for the runs that encode captions (all but (n)),
the bound with each image's caption on the text tower too (the text tower alone on the run's own
captions). Each bound is measured in a fresh process as a plain process runs the towers, then again
with glibc held to the memory they free ("memory held"), as every embed actor runs them
(model.hold_freed_memory); and the towers' rates again after the embed runs, since this machine's
speed drifts over minutes (the decode's share is measured once, before). Then, as `--parts` asks:
  (f) the start-up floor: in a fresh process, Ray started as `rayclip embed` starts it, then one
      empty actor: Ray's start, the actor's new process (Ray never leases an actor one of the
      workers it prestarts for tasks), ray.data and rayclip's embed module (what a Ray Data actor
      loads first) and torch and open_clip, the phases no cold run skips;
  (m) the image tower alone in two Ray actors, encoding on a thread of their own as Ray Data's call
      threads do: one as a plain process runs it, one with glibc held to the memory it frees (as
      every embed actor runs it), taking turns for five rounds: images/s and page faults each;
  (p) the bare fp32 loop (read + PIL decode + open_clip preprocess + encode_image) in one process
      with all cores as torch threads;
  (a) the same on the whole machine, one process per core, 1 thread each (the baseline);
  (b) (a) at the precision `auto` picks;
  (c) `rayclip embed --precision fp32` as a user runs it (a fresh process: imports, Ray start,
      actors, Parquet, commit);
  (d) `rayclip embed` with its defaults;
  (e) the same with the other decode layout (`--decode tasks` where auto picks actor, and back);
  (n) `rayclip embed --no-captions`: the images alone, to set (d)'s steady rate (captions encoded
      by the same actors) against;
  (o) `rayclip embed --runtime openvino`: (d) with the image tower on OpenVINO (needs the extra;
      its conversion is cached per model_version: the record says whether this run's came from it);
  (g) `rayclip embed --decode gpu` (with --gpus-per-actor only).
For each embed run: the whole command's images/s, the run record's, the steady rate, start-up phase
by phase (the run record's startup_breakdown) with the seconds before and after the run (measured
here, and the record's own before_run and after_run), the ratios run / steady and whole command /
steady, the whole command's seconds beyond rows / steady, and the GPU's utilisation (or "no GPU"),
and its startup_s over the floor (f); once the runs are done and the bounds measured again, each
run's steady / bound against each bound (and the bounds with captions for a run that encodes them):
against the mean of the bound before and after the runs, and against each; then (d)'s steady rate
over (n)'s, (o)'s over (d)'s, and each run over (a), (b) and (p) where they ran.
The default (1,024 images, parts fadn) takes about four minutes on a quiet 2-core machine (parts dn
took 2 min 18 s there, the bounds' four fresh processes included; (f) adds about ten seconds).

With --gpus-per-actor the bare loops and the GEMM run on the GPU too (every bare process shares
GPU 0, each decoding on its own core), so each ratio still compares like with like.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rayclip import images, model, synthetic
from rayclip.stages import ingest
from rayclip.store import layout

MODEL = "ViT-B-32"
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}  # a GPU needs larger products to be kept busy
HELD = ", memory held"  # a bound measured with glibc held to the memory the towers free


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


def captioned_store(root: Path, folder: Path, paths: list[Path]) -> list[str]:
    """The images ingested as a LAION-style download (img2dataset from loopback), each with its own
    caption (a scene's words and the image's number: distinct, as web captions mostly are); the captions."""
    rng = np.random.default_rng(1)
    captions = [f"{scene.caption}, photo {i}" for i, scene in enumerate(synthetic.random_scenes(len(paths), rng))]
    with synthetic.serve_folder(folder) as base:
        urls = [f"{base}/{path.name}" for path in paths]
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), folder.parent / "metadata.parquet")
        ingest.ingest_metadata(root, folder.parent / "metadata.parquet")
    return captions


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


def floor_worker(results) -> None:
    """Ray started as `rayclip embed` starts it, then one empty actor: the phases no run can skip."""
    import ray

    from rayclip.cluster import start as init_ray

    class EmptyActor:  # defined here: Ray ships a local class by value, a spawned __main__'s by name
        def __init__(self) -> None:
            self.entered = time.time()

        def imports(self) -> tuple[float, float, float]:
            """When __init__ ran; seconds importing what a Ray Data actor running EmbedUDF loads before
            its __init__ (ray.data, rayclip's embed module), then what EmbedUDF imports (torch, open_clip)."""
            started = time.perf_counter()
            import ray.data  # noqa: F401

            import rayclip.stages.embed  # noqa: F401

            loaded = time.perf_counter()
            model.import_model_libraries(MODEL)
            return self.entered, loaded - started, time.perf_counter() - loaded

    started = time.perf_counter()
    init_ray()
    up, requested = time.perf_counter(), time.time()
    entered, modules, imports = ray.get(ray.remote(num_cpus=0)(EmptyActor).remote().imports.remote())
    phases = {"ray_start": up - started, "actor_process": entered - requested, "actor_modules": modules}
    results.put(phases | {"imports": imports})
    ray.shutdown()


def startup_floor() -> dict[str, float]:
    """The start-up a cold `rayclip embed` cannot go below, in a fresh process: Ray's start alone, a
    fresh actor's process (requested → its __init__; Ray leases an actor a new worker process, never
    one of those it prestarts for tasks), the modules a Ray Data actor loads before its __init__, and
    the actor's imports of torch and open_clip (the run's actor_process and imports)."""
    return in_fresh_process("the start-up floor probe", floor_worker)


def in_fresh_process(name: str, worker_function, *args):
    """What worker_function(*args, results) puts in `results`, run in a spawned process (a Ray of its
    own, nothing of this process's state); the script exits with one line when it puts nothing."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=worker_function, args=(*args, results))
    worker.start()
    worker.join()  # the results are a few numbers: the queue's pipe never fills
    if results.empty():
        sys.exit(f"{name} exited {worker.exitcode} without a result")
    return results.get()


def held_memory_worker(precision: str, batch_size: int, rounds: int, results) -> None:
    """Two Ray actors with the image tower, encoding on a thread of their own (as Ray Data's call
    threads do), one as a plain process runs it and one with model.hold_freed_memory (as every embed
    actor): taking turns, so the machine's drift falls on both alike."""
    import concurrent.futures
    import resource

    import ray
    import torch

    from rayclip.cluster import start as init_ray

    class Tower:  # defined here: Ray ships a local class by value, a spawned __main__'s by name
        def __init__(self, held: bool) -> None:
            if held:  # main() runs this part only where the bound's probe could hold it
                model.hold_freed_memory()
            self.thread = concurrent.futures.ThreadPoolExecutor(1)
            spec, threads = model.resolve(MODEL, "none"), os.cpu_count() or 1
            self.clip = model.ClipModel.from_parts(model.load_model(spec, precision=precision).parts(), threads=threads)
            self.pixels = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
            self.thread.submit(self.clip.encode_uint8, self.pixels).result()  # warm: the first call allocates

        def encode(self, batches: int = 12) -> tuple[float, int]:
            """(images/s, minor page faults) over `batches` batches on the actor's encoding thread."""

            def timed() -> tuple[float, int]:
                faults, started = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.perf_counter()
                for _ in range(batches):
                    self.clip.encode_uint8(self.pixels)
                seconds = time.perf_counter() - started
                return batch_size * batches / seconds, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults

            return self.thread.submit(timed).result()

    init_ray()
    towers = {held: ray.remote(num_cpus=0)(Tower).remote(held) for held in (False, True)}
    measured = {False: [], True: []}
    for turn in range(rounds):
        for held in (False, True) if turn % 2 == 0 else (True, False):  # neither always first
            measured[held].append(ray.get(towers[held].encode.remote()))
    results.put(measured)
    ray.shutdown()


def held_memory(precision: str, batch_size: int, rounds: int = 5) -> dict[bool, list[tuple[float, int]]]:
    """(m): per round, (images/s, page faults) of the image tower in a Ray actor without and with held
    memory, in a fresh process."""
    return in_fresh_process("the held-memory probe", held_memory_worker, precision, batch_size, rounds)


def rayclip_embed(
    root: Path,
    precision: str,
    batch_size: int | None,
    gpus_per_actor: float,
    decode: str = "auto",
    captions: bool = True,
    runtime: str = "torch",
) -> tuple[float, dict, dict]:
    """The whole CLI command in a fresh process: (images/s over its wall time, its run record, the
    seconds around the run: before it (process start, imports, model resolve) and after (Ray's
    shut-down, exit), and the GPU's utilisation while it ran)."""
    version = f"bench_{precision}_{decode}_{runtime}" + ("" if captions else "_no_captions")
    command = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(root), "--model", MODEL]
    command += ["--pretrained", "none", "--precision", precision, "--save-as", version, "--decode", decode]
    command += ["--batch-size", str(batch_size)] if batch_size else []
    command += ["--gpus-per-actor", str(gpus_per_actor)] if gpus_per_actor else []
    command += [] if captions else ["--no-captions"]
    command += ["--runtime", runtime]
    launched, started = time.time(), time.perf_counter()
    with GpuSampler() as gpu:
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"RAY_ADDRESS": ""})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"rayclip embed --precision {precision} exited {done.returncode}:\n{done.stderr[-4000:]}")
    runs = [json.loads(p.read_text()) for p in layout.embed_runs_dir(root).glob("*.json")]
    run = next(r for r in runs if r["model_version"] == version and r["rows_embedded"])
    before = run["started_at"] - launched
    around = {"before": before, "after": wall - before - run["wall_s"], "wall": wall, "gpu": gpu.summary()}
    return run["rows_embedded"] / wall, run, around


class GpuSampler:
    """The GPU's utilisation sampled every half second while the block runs (pynvml, else nvidia-smi);
    summary() says "no GPU" where neither answers."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        read = _gpu_reader()
        while read is not None and not self.stop.wait(0.5):
            self.samples.append(read())

    def summary(self) -> str:
        if not self.samples:
            return "no GPU"
        mean, busiest = sum(self.samples) / len(self.samples), max(self.samples)
        return f"GPU busy {mean:.0f} % on average, {busiest:.0f} % at most ({len(self.samples)} samples)"


def _gpu_reader():
    """A function returning GPU 0's utilisation in percent, or None when there is no GPU to ask."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # not installed, or no driver
        pass
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"]
    try:
        subprocess.run(query, capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return lambda: float(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or 0)


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


def encoder_rate(precision: str, device: str, batch_size: int, images: int, runtime: str = "torch") -> float:
    """images/s of the image tower alone (normalise + encode of ready uint8 pixels, every core as
    torch's or OpenVINO's threads, or the GPU), the bound no pipeline around it passes; over about
    `images` images, as many as an embed run encodes, so that the machine's drift weighs on both alike."""
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    clip = model.load_model(model.resolve(MODEL, "none"), device=device, precision=precision)
    if runtime == "openvino":  # as an embed actor runs it: the parts with the converted tower
        clip = model.ClipModel.from_parts(clip.parts(model.image_tower(clip.spec)[0]), threads=threads)
    pixels = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
    clip.encode_uint8(pixels)  # warm: the first call allocates
    batches = max(1, round(images / batch_size))
    started = time.perf_counter()
    for _ in range(batches):
        clip.encode_uint8(pixels)  # returns numpy: a GPU's work is done when it does
    return batch_size * batches / (time.perf_counter() - started)


def text_rate(precision: str, device: str, captions: list[str], batch_size: int) -> float:
    """captions/s of the text tower alone, as an embed actor calls it for a batch's new captions
    (ClipModel.encode_texts, every core as torch's threads), on the run's own captions, each once."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    clip = model.load_model(model.resolve(MODEL, "none"), device=device, precision=precision)
    clip.encode_texts([f"a warm-up caption {i}" for i in range(batch_size)])  # the first call allocates
    started = time.perf_counter()
    for start in range(0, len(captions), batch_size):
        clip.encode_texts(captions[start : start + batch_size])
    return len(captions) / (time.perf_counter() - started)


def flops_per_image() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    clip = model.load_model(model.resolve(MODEL, "none"), precision="fp32")
    # With autograd on: under no_grad attention takes a fused kernel the counter does not see.
    with FlopCounterMode(display=False) as counter:
        clip.model.encode_image(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def show_run(label: str, whole: float, run: dict, around: dict, floor: float) -> None:
    """One `rayclip embed` run: its rates, start-up phase by phase, and the ratios the goals are set in
    but the bound's (show_ratios)."""
    steady, startup = run["steady_images_per_s"], run["startup_s"]
    runtime = run.get("runtime") or "torch"  # a record from before --runtime has none
    runtime += " (its conversion from the cache)" if run.get("converted_from_cache") else ""
    print(
        f"{label}: {whole:8.2f} images/s whole command ({around['wall']:.1f} s); run record {run['images_per_s']} "
        f"images/s over wall_s {run['wall_s']}; steady {steady} images/s after startup_s {startup} "
        f"(decode {run['decode']}; actors {run['actors']} x {run['torch_threads']} threads, "
        f"{run.get('decode_threads', 1)} decoding, batch {run['batch_size']}, {run['precision']} on {run['device']}, "
        f"runtime {runtime}; "
        f"decode {run['decode_s']} s, encode {run['encode_s']} s, write {run['write_s']} s; "
        f"{run.get('captions_embedded', 0)} captions encoded by the actors in {run.get('caption_encode_s', 0)} s)"
    )
    phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in run["startup_breakdown"].items())
    outside = (
        f"{around['before']:.2f} s before, {around['after']:.2f} s after "
        f"(the record's before_run {run['startup_breakdown'].get('before_run')}, "
        f"after_run {run['startup_breakdown'].get('after_run')}; the rest is the interpreter's exit)"
    )
    over_floor = f"; startup_s / floor = {startup / floor:.2f}" if floor else ""
    print(f"    start-up: {phases} (s); outside the run: {outside}{over_floor}")
    print(
        f"    run / steady = {run['images_per_s'] / steady:.2f}; whole command / steady = {whole / steady:.2f}; "
        f"whole - rows/steady = {around['wall'] - run['rows_embedded'] / steady:.1f} s; {around['gpu']}"
    )


def show_ratios(part: str, run: dict, before: dict[str, float], after: dict[str, float]) -> None:
    """Run `part`'s steady rate over each bound in `before` (measured before the runs): against the
    mean of that bound before and after the runs, and against each."""
    steady = run["steady_images_per_s"]
    shown = [
        f"{steady / ((bound + after[name]) / 2):.2f} ({name}: "
        f"{steady / bound:.2f} before, {steady / after[name]:.2f} after)"
        for name, bound in before.items()
        if name in after
    ]
    print(f"({part}) steady / bound, the bound's mean before and after the runs: {'; '.join(shown)}")


def towers_worker(
    held: bool, precision: str, device: str, batch_size: int, images: int, runtimes, captions, results
) -> None:
    """The towers' own rates in this (fresh) process: the image tower alone on each runtime (over
    `images` images), and the text tower on the run's captions when given; with `held`, glibc held
    first to the memory they free, as every embed actor runs them (None where this C library cannot)."""
    if held and not model.hold_freed_memory():
        results.put(None)
        return
    rates = {runtime: encoder_rate(precision, device, batch_size, images, runtime) for runtime in runtimes}
    results.put((rates, text_rate(precision, device, captions, batch_size) if captions else None))


def measure_bounds(
    when: str,
    precision: str,
    device: str,
    batch_size: int,
    images: int,
    runtimes,
    captions,
    decode: float,
    limit: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """The bounds the steady rate is held to, printed, each measured in a fresh process: as a plain
    process runs the towers, then with glibc held to the memory they free (as every embed actor runs
    them). (name -> images/s, the same with each image's caption on the text tower too.)"""
    cpus = os.cpu_count() or 1
    bounds, caption_bounds = {}, {}
    for held in (False, True):
        measured = in_fresh_process(
            "the bound probe", towers_worker, held, precision, device, batch_size, images, runtimes, captions
        )
        if measured is None:
            print("memory held: not on this C library (glibc only); the actors do not hold it either")
            break
        rates, texts = measured
        how = HELD if held else ""
        for runtime, encoder in rates.items():
            bounds[runtime + how] = 1 / (1 / encoder + decode / cpus)
            print(
                f"the bound{when} ({runtime}{how}): {MODEL} image tower alone at {precision} (batch {batch_size}, "
                f"{cpus} threads): {encoder:.1f} images/s ({encoder / limit:.2f} of the GEMM limit); with the "
                f"decode shared over {cpus} cores: {bounds[runtime + how]:.1f} images/s"
            )
        if texts:  # what a run with captions (the default) does per image beyond that: its caption
            with_captions = {
                f"{runtime}{how}, with its caption": 1 / (1 / bounds[runtime + how] + 1 / texts) for runtime in rates
            }
            caption_bounds |= with_captions
            shown = ", ".join(f"{bound:.1f} ({name})" for name, bound in with_captions.items())
            print(
                f"the bound with captions{when}{how}: the text tower alone on the run's captions, one per image: "
                f"{texts:.1f} captions/s; with the image tower and the decode as above: {shown} images/s"
            )
    return bounds, caption_bounds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="the bare loops' batch (rayclip: its default)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="run the embeds (and the bare loops) on GPUs")
    parser.add_argument(
        "--parts",
        default="fadn",
        help="which of (f), (m), (p), (a)-(e), (n), (o) and (g) to run, e.g. abcde (d/a: a and d)",
    )
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    device = "cuda" if args.gpus_per_actor else "cpu"
    chosen = model.choose_precision("auto", device)
    from rayclip.stages.embed import choose_decode

    layout_auto = choose_decode("auto", args.gpus_per_actor)
    layout_other = "actor" if layout_auto == "tasks" else "tasks"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        paths = make_images(Path(tmp) / "images", args.images)
        captions = captioned_store(root, Path(tmp) / "images", paths)
        print(
            f"{args.images} JPEGs, 256-640 px, each with a distinct caption; {MODEL} random init; {cpus} CPUs; "
            f"{device}; auto picks {chosen} here"
        )

        # The machine's ceiling first: what the goals are measured against.
        flops = flops_per_image()
        gemm = {p: gemm_gflops(p, device) for p in dict.fromkeys(["fp32", chosen])}
        limit = gemm[chosen] * 1e9 / flops
        decode = decode_seconds(paths)
        ceiling = 1 / (1 / limit + decode / cpus)
        print(f"{MODEL} encode_image: {flops / 1e9:.2f} GFLOP per image (torch.utils.flop_counter)")
        gemms = ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in gemm.items())
        print(f"GEMM {gemms} ({GEMM_SIZE[device]}^2 on {device}); compute limit at {chosen}: {limit:.1f} images/s")
        # Every image is also decoded and preprocessed on some core: with the encoder at the GEMM
        # rate on every core, a machine of `cpus` cores still spends decode/cpus seconds per image.
        print(
            f"decode + preprocess: {decode * 1000:.1f} ms of one core per image; "
            f"ceiling with the encoder at the GEMM rate: {ceiling:.1f} images/s"
        )
        runtimes = ["torch", "openvino"] if "o" in args.parts and not args.gpus_per_actor else ["torch"]
        run_captions = captions if set(args.parts) & set("cdego") else None  # for the runs that encode them
        measure = functools.partial(
            measure_bounds, precision=chosen, device=device, batch_size=args.batch_size, images=args.images,
            runtimes=runtimes, captions=run_captions, decode=decode, limit=limit,
        )  # fmt: skip
        bounds, caption_bounds = measure("")
        holds = any(HELD in name for name in bounds)  # whether this C library holds freed memory

        floor = 0.0
        if "f" in args.parts:
            phases = startup_floor()
            floor = sum(phases.values())
            shown = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in phases.items())
            print(f"(f) start-up floor, one empty actor in a fresh process: {shown}; {floor:.2f} s before any batch")

        if "m" in args.parts and not args.gpus_per_actor and holds:
            measured = held_memory(chosen, args.batch_size)
            for held, label in ((False, "as a plain process runs it"), (True, "memory held, as embed's actors")):
                rates = ", ".join(f"{rate:.1f}" for rate, _ in measured[held])
                faults = ", ".join(str(count) for _, count in measured[held])
                print(f"(m) image tower in a Ray actor, {label}: {rates} images/s; page faults {faults}")
            gains = [held[0] / plain[0] for plain, held in zip(measured[False], measured[True])]
            print(f"(m) held / plain, round by round: {', '.join(f'{gain:.2f}' for gain in gains)}")

        a1 = a = b = float("nan")
        if "p" in args.parts:
            a1 = bare_loop(paths, args.batch_size, 1, cpus, device, "fp32")
            print(f"(p) bare fp32 loop on {device}, 1 process x {cpus} threads:          {a1:8.2f} images/s")
        if "a" in args.parts:
            a = bare_loop(paths, args.batch_size, cpus, 1, device, "fp32")
            print(f"(a) bare fp32 loop on {device}, {cpus} processes x 1 thread (baseline): {a:8.2f} images/s")
        if "b" in args.parts:
            b = bare_loop(paths, args.batch_size, cpus, 1, device, chosen)
            print(f"(b) bare {chosen} loop on {device}, {cpus} processes x 1 thread:           {b:8.2f} images/s")
        commands = {
            "c": ("(c) rayclip embed --precision fp32", "fp32", "auto"),
            "d": (f"(d) rayclip embed (defaults: decode {layout_auto})", "auto", "auto"),
            "e": (f"(e) rayclip embed --decode {layout_other}", "auto", layout_other),
            "n": ("(n) rayclip embed --no-captions (the images alone)", "auto", "auto"),
            "o": ("(o) rayclip embed --runtime openvino", "auto", "auto"),
            "g": ("(g) rayclip embed --decode gpu", "auto", "gpu"),
        }
        runs = {}
        for part, (label, precision, where) in commands.items():
            if part in args.parts and (part != "g" or args.gpus_per_actor) and (part != "o" or not args.gpus_per_actor):
                captions, runtime = part != "n", "openvino" if part == "o" else "torch"
                whole, run, around = rayclip_embed(root, precision, None, args.gpus_per_actor, where, captions, runtime)
                runs[part] = whole, run, around
                show_run(label, whole, run, around, floor)
        if runs:  # the machine's speed drifts over minutes: each run is set against the bounds on both sides
            after, caption_after = measure(" again, after the runs")
            for part, (_, run, _) in runs.items():
                captioned = part != "n"
                show_ratios(part, run, bounds | (caption_bounds if captioned else {}), after | caption_after)
        if "d" in runs and "n" in runs:
            with_captions, alone = runs["d"][1]["steady_images_per_s"], runs["n"][1]["steady_images_per_s"]
            print(f"steady images/s with the captions encoded beside them / without: {with_captions / alone:.2f}")
        if "d" in runs and "o" in runs:
            on_openvino, on_torch = runs["o"][1]["steady_images_per_s"], runs["d"][1]["steady_images_per_s"]
            print(f"steady images/s with the image tower on OpenVINO / on torch: {on_openvino / on_torch:.2f}")
        for part, (whole, run, _) in runs.items():
            steady = run["steady_images_per_s"]
            ratios = [f"{part}/a = {whole / a:.2f} whole command, {steady / a:.2f} steady"]
            ratios += [f"{part}/b = {whole / b:.2f}, {steady / b:.2f}"] if "b" in args.parts else []
            ratios += [f"{part}/a(1 process) = {whole / a1:.2f}, {steady / a1:.2f}"] if "p" in args.parts else []
            print("; ".join(ratios))


if __name__ == "__main__":
    main()
