"""How serve holds the image index: in RAM, memory-mapped (--mmap), or in 2 shards behind Ray Serve (--ray).

    .venv/bin/python benchmarks/bench_serve_forms.py [--vectors 200000] [--index-type IVF1024,Flat]
        [--queries 300] [--skip-ray]

One build of clustered vectors (the reference model's 128 dims, so text queries are real encodes), and
a copy of it kept in 2 shards. Each form is served on 127.0.0.1 in a process of its own (`rayclip
serve`, `--mmap`, `--ray` on a local Ray cluster); one client sends the same text queries to
/api/search, sequentially, after a warm-up. Prints the server's private (RssAnon) and file-backed
(RssFile) resident memory after the queries (from /api/status), the index's bytes, and query p50/p99
of each form with its ratio to in-RAM, and the server-wide private memory, the model aside (the
server's RssAnon less a server of the same model on a 2000-row build), against the index bytes.
Goals: mmap's server-wide private memory, the model aside, below a third of the index bytes; mmap's
warm p50 within 2x of in-RAM; the shards answer as the whole index.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import percentiles, random_silver

from rayclip import model
from rayclip.stages import index
from rayclip.store import layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.index_forms import sharded_copy  # noqa: E402 - the same index built again with --shards 2
from helpers.ports import free_port  # noqa: E402

QUERIES = [f"a photo of item {i}, number {i % 97} in a series" for i in range(50)]
SERVE = "import sys; from rayclip.cli import main; sys.exit(main(sys.argv[1:]))"


@contextlib.contextmanager
def served(root: Path, *flags: str):
    """`rayclip serve` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-c", SERVE, "serve", "--data-dir", str(root), "--port", str(port), *flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"serve {' '.join(flags)} exited: {server.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/api/status", timeout=5).status_code == 200:
                    break
            time.sleep(1)
        yield base
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: serve --ray takes Serve and its local Ray down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(base: str, queries: int) -> dict:
    """Warm up, then `queries` sequential text searches: latency percentiles, the answers, memory."""
    latencies, answers = [], []
    with httpx.Client(base_url=base, timeout=60) as http:
        for text in QUERIES:  # warm: the model's first calls, the mapped pages the queries touch
            http.get("/api/search", params={"q": text, "k": 10}).raise_for_status()
        for i in range(queries):
            started = time.perf_counter()
            response = http.get("/api/search", params={"q": QUERIES[i % len(QUERIES)], "k": 10})
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            answers.append([(r["faiss_id"], r["score"]) for r in response.json()["results"]])
        status = http.get("/api/status").json()
    return {"answers": answers, "status": status} | percentiles(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--index-type", default="IVF1024,Flat")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--skip-ray", action="store_true", help="RAM and mmap only")
    args = parser.parse_args()
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    with tempfile.TemporaryDirectory(prefix="rayclip-bench-forms-") as tmp:
        root = Path(tmp) / "data"
        random_silver(root, spec, args.vectors, 128)
        report = index.build(root, index_type=args.index_type)
        sharded = sharded_copy(root, Path(tmp) / "sharded", report.model_version, report.build_id)
        tiny = Path(tmp) / "tiny"
        random_silver(tiny, spec, 2000, 128)
        index.build(tiny, index_type="Flat")
        forms = {"in RAM": (root, ()), "mmap": (root, ("--mmap",)), "model alone (2000 rows)": (tiny, ())}
        if not args.skip_ray:
            forms["2 shards, Ray Serve"] = (sharded, ("--ray",))
        results = {}
        for name, (data, flags) in forms.items():
            with served(data, *flags) as base:
                results[name] = measure(base, args.queries)
        index_file = layout.index_file(layout.build_dir(root, report.model_version, report.build_id))
        alone = {how: index_alone(index_file, how, args.queries, args.index_type) for how in ("ram", "mmap")}
    show(results, alone, args)


# The index alone, in a fresh process: read (into RAM or mapped) and searched, RssAnon before and after.
INDEX_ALONE = """
import json, pathlib, sys, types
import numpy as np
from rayclip.query import knn

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

path, how, queries, index_type = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
vectors = np.random.default_rng(0).standard_normal((queries, 128)).astype(np.float32)
before = anon()
info = types.SimpleNamespace(form="single", index_type=index_type, search_params={"nprobe": 16})
index = knn.read_local(path, info, how == "mmap")
for vector in vectors:
    knn.search(index, vector[None], 10, None)
print(json.dumps({"grew": anon() - before}))
"""


def index_alone(path: Path, how: str, queries: int, index_type: str) -> int:
    """RssAnon growth of a fresh process reading the index (in RAM or mapped) and searching it."""
    command = [sys.executable, "-c", INDEX_ALONE, str(path), how, str(queries), index_type]
    run = subprocess.run(command, capture_output=True)
    if run.returncode:
        raise SystemExit(run.stderr.decode()[-2000:])
    return json.loads(run.stdout)["grew"]


def show(results: dict, alone: dict, args: argparse.Namespace) -> None:
    base = results["in RAM"]
    index_bytes = base["status"]["index_bytes"]
    print(f"{args.vectors} vectors, {args.index_type}: index {index_bytes / 2**20:.1f} MiB, {args.queries} queries")
    heads = ("RssAnon MiB", "RssFile MiB", "p50 ms", "p99 ms", "p50 x", "p99 x")
    print(f"{'form':22} " + " ".join(f"{h:>{max(6, len(h))}}" for h in heads) + "  same answers")
    for name, got in results.items():
        memory = got["status"]["memory"]
        anon, file = memory["resident_private_bytes"] / 2**20, memory["resident_file_bytes"] / 2**20
        ratios = f"{got['p50_ms'] / base['p50_ms']:6.2f} {got['p99_ms'] / base['p99_ms']:6.2f}"
        same = "-" if got["status"]["count"] != base["status"]["count"] else got["answers"] == base["answers"]
        print(f"{name:22} {anon:11.1f} {file:11.1f} {got['p50_ms']:6.2f} {got['p99_ms']:6.2f} {ratios}  {same}")
    private = {name: got["status"]["memory"]["resident_private_bytes"] for name, got in results.items()}
    saved = private["in RAM"] - private["mmap"]
    print(f"server's private memory mmap saves: {saved / 2**20:.1f} MiB = {saved / index_bytes:.2f} of the index bytes")
    for name in ("in RAM", "mmap"):  # the goal: mmap's below a third of the index bytes
        build = private[name] - private["model alone (2000 rows)"]
        ratio = build / index_bytes
        print(f"server-wide, model aside ({name}): RssAnon {build / 2**20:.1f} MiB = {ratio:.3f} of the index bytes")
    for how, grew in alone.items():
        print(f"the index alone ({how}): RssAnon +{grew / 2**20:.1f} MiB = {grew / index_bytes:.3f} of its bytes")
    print("(model alone: the same server on a 2000-row build. mmap maps the index and the mapping's Arrow")
    print(" copy; in RAM reads both. Ray Serve's row: the ingress replica, each shard maps its shard)")
    kept = ("count", "memory", "form", "index_bytes", "mapped_index_bytes")
    shown = {name: {k: got["status"][k] for k in kept} | percentiles_of(got) for name, got in results.items()}
    print(json.dumps(shown))


def percentiles_of(got: dict) -> dict:
    return {k: v for k, v in got.items() if k.endswith("_ms")}


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
