"""Run `rayclip index` unchanged against a two-node Ray cluster (two raylets on this machine): a full
build in parts, kept as one file (the other forms finish the same parts: test_distributed_index.py
builds them on the session's cluster).

Used by test_distributed_index.py in a subprocess so that it does not share the test session's Ray.
Usage: python multinode_index.py DATA_DIR INDEX_TYPE PART_VECTORS
Prints one JSON object: {"single": the build_id that `rayclip index --json` reported}.
"""

import json
import os
import subprocess
import sys

from helpers import two_node_cluster

if __name__ == "__main__":
    data_dir, index_type, part_vectors = sys.argv[1:]
    cluster = two_node_cluster.start()
    try:
        cmd = [sys.executable, "-m", "rayclip.cli", "index", "--data-dir", data_dir, "--retrain", "--json"]
        cmd += ["--index-type", index_type, "--part-vectors", part_vectors]
        # No test-only setting: $RAY_ADDRESS alone makes the build's steps Ray tasks on that cluster.
        env = os.environ | {"RAY_ADDRESS": cluster.address}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode or not done.stdout.startswith("{"):  # one JSON document, or why not
            print(f"failed: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            sys.exit(1)
        if stray := two_node_cluster.off_loopback(cluster):
            print(f"failed: addresses beyond loopback: {stray}")
            sys.exit(1)
        print(json.dumps({"single": json.loads(done.stdout)["build_id"]}))
    finally:
        cluster.shutdown()
