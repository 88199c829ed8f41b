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
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayclip.store import catalog, storage


@ray.remote(num_cpus=0.1)
def temp_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def worker_temp_dirs(address: str) -> list[str]:
    """tempfile.gettempdir() in a worker on each node: where an actor's temporary files would go."""
    ray.init(address=address, log_to_driver=False)
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        on_each = [NodeAffinitySchedulingStrategy(node, soft=False) for node in nodes]
        return ray.get([temp_dir.options(scheduling_strategy=strategy).remote() for strategy in on_each])
    finally:
        ray.shutdown()  # the cluster's nodes can only be removed once this driver has left


if __name__ == "__main__":
    data_dir = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cmd = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", data_dir, "--pretrained", "reference"]
        # No test-only setting: `rayclip embed` waits for its whole actor pool by default.
        env = os.environ | {"RAY_ADDRESS": cluster.address}
        # 24 images at batch 8: three batches for two actors (at the default 32 they would be one).
        done = subprocess.run(cmd + ["--actors", "2", "--batch-size", "8", "--no-captions"], env=env, timeout=300)
        runs = sorted(
            (r for stage, _, r in catalog.run_records(storage.data_root(data_dir)) if stage == "embed"),
            key=lambda r: r["run_id"],
        )
        if done.returncode or not runs:
            print(f"failed: {done.returncode}")
        else:
            session_dir = cluster.head_node.get_session_dir_path()
            temps = worker_temp_dirs(cluster.address)
            print(json.dumps({"run": runs[-1], "session_dir": session_dir, "actor_temp_dirs": temps}))
    finally:
        cluster.shutdown()
