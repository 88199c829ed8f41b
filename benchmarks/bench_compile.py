"""Would compiling the image tower pay? open_clip's eager forward vs `torch.compile` of it, one process.

    .venv/bin/python benchmarks/bench_compile.py [--precision auto] [--batch-size 32] [--seconds 15]

ViT-B-32 (random init: speed does not depend on the weights) loaded as `rayclip embed` loads it
(model.load_model, one process with every core as torch threads, like the default actor), on
random pixels so that only the encoder is timed. Prints images/s of the eager image tower and of
`torch.compile` of it (Inductor, with freezing and weight prepacking), the compile time, which
every actor of a run would pay before its first batch, the ratio, the least cosine between the
two, and how many images an actor must encode before the compile has paid for itself.

The compile runs with a fresh Inductor cache, as a new machine would (a warm cache shortens it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from rayclip import model

MODEL = "ViT-B-32"


def images_per_s(encode, pixels, seconds: float) -> float:
    encode(pixels)  # warm: the first call allocates
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        encode(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each form is timed")
    args = parser.parse_args()
    # A fresh Inductor cache for each run, as a new machine has; removed afterwards.
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        measure(args.precision, args.batch_size, args.seconds)


def measure(precision: str, batch_size: int, seconds: float) -> None:
    import torch
    import torch._inductor.config as inductor

    cpus = os.cpu_count() or 1
    clip = model.load_model(model.resolve(MODEL, "none"), threads=cpus, precision=precision)
    pixels = torch.randn(batch_size, 3, 224, 224).to(clip.input_dtype)
    tower = clip.model.visual
    print(f"{MODEL} image tower at {clip.precision}, batch {batch_size}, 1 process x {cpus} torch threads")

    with torch.no_grad():
        eager_out = tower(pixels).float()
        eager = images_per_s(tower, pixels, seconds)
        print(f"eager (open_clip):         {eager:8.2f} images/s")

        inductor.freezing = True  # weights are constants: Inductor folds and prepacks them
        compiled = torch.compile(tower)
        started = time.perf_counter()
        compiled_out = compiled(pixels).float()
        compile_s = time.perf_counter() - started
        fast = images_per_s(compiled, pixels, seconds)
    cosine = torch.nn.functional.cosine_similarity(eager_out, compiled_out).min().item()
    saved_per_image = 1 / eager - 1 / fast
    print(f"torch.compile (Inductor):  {fast:8.2f} images/s after {compile_s:.1f} s of compiling")
    print(f"compiled / eager = {fast / eager:.2f}; least cosine compiled vs eager {cosine:.5f}")
    if saved_per_image > 0:
        print(f"the compile pays for itself after {compile_s / saved_per_image:,.0f} images per actor")
    else:
        print("the compiled tower is not faster here")


if __name__ == "__main__":
    main()
