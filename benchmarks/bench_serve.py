"""HTTP service under load: N concurrent clients on loopback for a bounded time, per model.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--seconds 60] [--vectors 10000]
        [--models reference ViT-B-32] [--rebuild-every 1]

For each model (the offline reference model, and ViT-B-32 with random weights: the production
architecture's encode cost) it serves a gold build of random vectors with uvicorn on 127.0.0.1,
runs the clients (text queries are real encodes) and prints QPS, p50/p99 latency and errors.
With --rebuild-every S it then runs them again while another process publishes a new build
every S seconds, and prints the p99 ratio against the run without rebuilds
(goal: 0 errors, ratio <= 2).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from _common import percentiles, random_silver, timed_build

from rayclip import model
from rayclip.http.app import create_app
from rayclip.stages import index

QUERIES = [
    "a large red circle on the left",
    "a small blue star",
    "a purple cross on a black background",
    "a yellow square",
]
MODELS = {"reference": (None, model.REFERENCE_ALIAS), "ViT-B-32": ("ViT-B-32", model.RANDOM_INIT)}


def client(base: str, deadline: float, latencies: list[float], errors: list[str], seed: int) -> None:
    with httpx.Client(base_url=base, timeout=30) as http:
        i = seed
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = http.get("/api/search", params={"q": QUERIES[i % len(QUERIES)], "k": 10})
                if response.status_code != 200:
                    errors.append(str(response.status_code))
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - started)
            i += 1


def load(base: str, clients: int, seconds: float) -> dict:
    """Run the clients for `seconds`; QPS, latency percentiles and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(base, deadline, latencies, errors, i)) for i in range(clients)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "qps": round(len(latencies) / elapsed, 1), "errors": len(errors)} | (
        percentiles(latencies)
    )


def publish_loop(root: Path, every: float, seconds: float) -> None:
    """Publish a new build of the same silver every `every` seconds (run as its own process).

    Says "ready" once its imports are done, so the clock starts with the first publication.
    """
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    builds = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        index.build(root)
        builds += 1
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    print(builds)


def bench_model(name: str, args: argparse.Namespace) -> None:
    spec = model.resolve(*MODELS[name])
    dim = model.load_model(spec).dim
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        random_silver(root, spec, args.vectors, dim)
        timed_build(root)
        server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=0, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        httpx.get(base + "/api/search", params={"q": "warm up"}, timeout=120)
        print(
            f"{name} ({spec.model_version}, dim {dim}): "
            f"{args.clients} clients x {args.seconds:.0f} s, {args.vectors} vectors"
        )
        steady = load(base, args.clients, args.seconds)
        print(f"  no rebuilds       {steady}")
        if args.rebuild_every:
            publisher = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--publish-loop",
                    str(root),
                    "--rebuild-every",
                    str(args.rebuild_every),
                    "--seconds",
                    str(args.seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            publisher.stdout.readline()  # "ready"
            rebuilding = load(base, args.clients, args.seconds)
            builds = publisher.communicate(timeout=args.seconds + 300)[0].strip()
            ratio = rebuilding["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] else float("nan")
            print(f"  rebuild every {args.rebuild_every:g} s ({builds} builds published) {rebuilding}")
            verdict = "met" if rebuilding["errors"] == 0 and ratio <= 2 else "MISSED"
            print(f"  p99 with rebuilds / without = {ratio:.2f}x; goal 0 errors and <= 2x: {verdict}")
        server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["reference", "ViT-B-32"])
    parser.add_argument("--rebuild-every", type=float, default=1.0, help="seconds between builds (0: no rebuild run)")
    parser.add_argument("--publish-loop", default=None, help=argparse.SUPPRESS)  # the publisher process
    args = parser.parse_args()
    if args.publish_loop:
        publish_loop(Path(args.publish_loop), args.rebuild_every, args.seconds)
        return
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
