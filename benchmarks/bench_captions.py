"""Where caption encoding should run: the driver against a Ray Data actor pool, by caption count.

    .venv/bin/python benchmarks/bench_captions.py [--captions 25 1000 4000] [--batch-size 32]

For each count: a local data root with that many embedded images (made-up 128-d vectors filed under
the reference model, _common.random_silver) each with its own caption, then captions.embed_captions
twice on fresh copies, once with the driver encoding (DRIVER_ENCODE_CAPTIONS above the count) and once on one actor of a
Ray Data pool (DRIVER_ENCODE_CAPTIONS 0), in the same warm Ray session. Prints each run's wall
seconds (plan, encode, score, commit) and the ratio ray / driver: where it falls to about 1 is where
the actor pool stops costing more than it saves (on more CPUs, --actors N moves it down).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import random_silver

from rayclip import cluster, model
from rayclip.stages import captions

DIM = 128  # the reference model's


def timed(count: int, batch_size: int, on_ray: bool) -> float:
    captions.DRIVER_ENCODE_CAPTIONS = 0 if on_ray else count
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        random_silver(root, spec, count, DIM)  # one distinct caption per image
        report = captions.embed_captions(root, spec, batch_size=batch_size)
    assert report.captions_embedded == report.pairs_scored == count and bool(report.actors) == on_ray
    return report.wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, nargs="+", default=[25, 1000, 4000])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    cluster.init(include_dashboard=False, log_to_driver=False)
    timed(8, args.batch_size, on_ray=True)  # Ray's own first start-up is no caption run's cost
    print(f"{'captions':>9} {'driver s':>9} {'ray s':>9} {'ray/driver':>11}")
    for count in args.captions:
        driver, ray = timed(count, args.batch_size, False), timed(count, args.batch_size, True)
        print(f"{count:>9} {driver:>9.2f} {ray:>9.2f} {ray / max(driver, 1e-9):>11.1f}")


if __name__ == "__main__":
    main()
