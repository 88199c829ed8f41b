"""Run `rayclip embed` unchanged against a two-node Ray cluster (two raylets on this machine).

Used by test_embed.py and test_embed_s3.py in a subprocess so that it does not share the test
session's Ray. Usage: python multinode_embed.py DATA_DIR   (DATA_DIR: a local path or s3://…)
Prints one JSON object: the run's record ("run"), the cluster's session folder ("session_dir") and
the temp folder a worker on each node sees ("actor_temp_dirs").
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


if __name__ == "__main__":
    data_dir = sys.argv[1]
    cluster = two_node_cluster.start()
    try:
        cmd = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", data_dir, "--pretrained", "reference"]
        # No test-only setting: `rayclip embed` waits for its whole actor pool by default.
        env = os.environ | {"RAY_ADDRESS": cluster.address}
        # 24 images at batch 8: three batches for two actors (at the default 32 they would be one).
        done = subprocess.run(cmd + ["--actors", "2", "--batch-size", "8", "--no-captions"], env=env, timeout=300)
        runs = embed_runs(storage.data_root(data_dir))
        stray = two_node_cluster.off_loopback(cluster)
        if done.returncode or not runs or stray:
            print(f"failed: {done.returncode}, addresses beyond loopback: {stray}")
        else:
            session_dir = cluster.head_node.get_session_dir_path()
            temps = worker_temp_dirs(cluster.address)
            print(json.dumps({"run": runs[-1], "session_dir": session_dir, "actor_temp_dirs": temps}))
    finally:
        cluster.shutdown()
