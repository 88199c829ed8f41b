"""Run `rayclip embed` and `rayclip index` unchanged against one two-node Ray cluster (two raylets on
this machine), one after the other: the embed with its data root on S3, the index build (a full
build in parts, kept as one file) on a local root.

Used by test_two_nodes.py in a subprocess so that it does not share the test session's Ray.
Usage: python multinode.py EMBED_DATA_DIR INDEX_DATA_DIR INDEX_TYPE PART_VECTORS
Prints one JSON object: the embed's run record ("run"), the cluster's session folder ("session_dir"),
the temp folder a worker on each node sees ("actor_temp_dirs"), and the build_id that `rayclip index
--json` reported ("single"); or a line saying what failed, and exits 1.
"""

import json
import os
import subprocess
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from helpers import two_node_cluster
from helpers.stores import embed_runs
from rayclip import cluster as rayclip_cluster
from rayclip.store import storage


@ray.remote(num_cpus=0.1)
def temp_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def worker_temp_dirs(address: str) -> list[str]:
    """tempfile.gettempdir() in a worker on each node: where an actor's temporary files would go."""
    os.environ["RAY_ADDRESS"] = address
    rayclip_cluster.start()  # as a `rayclip` command joins: a cluster on loopback is joined there
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        on_each = [NodeAffinitySchedulingStrategy(node, soft=False) for node in nodes]
        return ray.get([temp_dir.options(scheduling_strategy=strategy).remote() for strategy in on_each])
    finally:
        ray.shutdown()  # the cluster's nodes can only be removed once this driver has left


def rayclip(*args: str, address: str) -> subprocess.CompletedProcess:
    """The command as a user runs it; no test-only setting: $RAY_ADDRESS alone makes it join."""
    cmd = [sys.executable, "-m", "rayclip.cli", *args]
    return subprocess.run(cmd, env=os.environ | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300)


def fail(why: str) -> None:
    print(f"failed: {why}")
    sys.exit(1)


if __name__ == "__main__":
    embed_dir, index_dir, index_type, part_vectors = sys.argv[1:]
    cluster = two_node_cluster.start()
    try:
        # 24 images at batch 8: three batches for two actors (at the default 32 they would be one).
        # `rayclip embed` waits for its whole actor pool by default.
        args = ["--data-dir", embed_dir, "--pretrained", "reference", "--actors", "2", "--batch-size", "8"]
        embedded = rayclip("embed", *args, "--no-captions", address=cluster.address)
        runs = embed_runs(storage.data_root(embed_dir))
        if embedded.returncode or not runs:
            fail(f"embed exit {embedded.returncode}\n{embedded.stdout[-2000:]}\n{embedded.stderr[-4000:]}")
        args = ["--data-dir", index_dir, "--retrain", "--json", "--index-type", index_type]
        built = rayclip("index", *args, "--part-vectors", part_vectors, address=cluster.address)
        if built.returncode or not built.stdout.startswith("{"):  # one JSON document, or why not
            fail(f"index exit {built.returncode}\n{built.stdout[-2000:]}\n{built.stderr[-4000:]}")
        if stray := two_node_cluster.off_loopback(cluster):
            fail(f"addresses beyond loopback: {stray}")
        found = {
            "run": runs[-1],
            "session_dir": cluster.head_node.get_session_dir_path(),
            "actor_temp_dirs": worker_temp_dirs(cluster.address),
            "single": json.loads(built.stdout)["build_id"],
        }
        print(json.dumps(found))
    finally:
        cluster.shutdown()
