"""Run `rayclip embed` unchanged against a two-node Ray cluster (two raylets on this machine).

Used by test_embed.py in a subprocess so that it does not share the test session's Ray.
Usage: python multinode_embed.py DATA_DIR   (prints the run's JSON)
"""

import os
import subprocess
import sys
from pathlib import Path

from ray.cluster_utils import Cluster

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
        runs = sorted(Path(data_dir, "silver", "runs").glob("*.json"))
        print(runs[-1].read_text() if done.returncode == 0 and runs else f"failed: {done.returncode}")
    finally:
        cluster.shutdown()
