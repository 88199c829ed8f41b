"""Run `rayclip embed` unchanged against a two-node Ray cluster (two raylets on this machine).

Used by test_embed.py and test_embed_s3.py in a subprocess so that it does not share the test
session's Ray. Usage: python multinode_embed.py DATA_DIR   (DATA_DIR: a local path or s3://…)
Prints one JSON object: the run's record ("run") and the cluster's session folder ("session_dir").
"""

import json
import os
import subprocess
import sys

from ray.cluster_utils import Cluster

from rayclip.store import catalog, storage

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
        done = subprocess.run(cmd + ["--actors", "2", "--batch-size", "8"], env=env, timeout=300)
        runs = sorted(
            (r for stage, _, r in catalog.run_records(storage.data_root(data_dir)) if stage == "embed"),
            key=lambda r: r["run_id"],
        )
        if done.returncode or not runs:
            print(f"failed: {done.returncode}")
        else:
            print(json.dumps({"run": runs[-1], "session_dir": cluster.head_node.get_session_dir_path()}))
    finally:
        cluster.shutdown()
