"""HTTP service under load: N concurrent clients on loopback for a bounded time.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--seconds 20] [--vectors 10000]

Serves a gold build of random vectors for the offline reference model (text queries are real
encodes) with uvicorn on 127.0.0.1; prints QPS, p50/p99 latency and the error count.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from _common import percentiles, random_silver, timed_build

from rayclip import model
from rayclip.server import create_app

QUERIES = [
    "a large red circle on the left",
    "a small blue star",
    "a purple cross on a black background",
    "a yellow square",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--vectors", type=int, default=10_000)
    args = parser.parse_args()
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        random_silver(root, spec, args.vectors, 128)
        timed_build(root)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        httpx.get(base + "/api/search", params={"q": "warm up"}, timeout=60)
        latencies: list[float] = []
        errors: list[str] = []
        deadline = time.perf_counter() + args.seconds
        threads = [
            threading.Thread(target=client, args=(base, deadline, latencies, errors, i)) for i in range(args.clients)
        ]
        started = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        elapsed = time.perf_counter() - started
        server.should_exit = True
        print(f"{args.clients} clients x {args.seconds:.0f} s, {args.vectors} vectors, {spec.model_version}")
        print(
            f"requests={len(latencies)}  QPS={len(latencies) / elapsed:.1f}  "
            f"latency={percentiles(latencies)}  errors={len(errors)}"
        )


if __name__ == "__main__":
    main()
