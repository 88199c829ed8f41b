"""rayclip's commands unchanged on a two-node Ray cluster (two raylets with 1 CPU each, on this
machine): `rayclip embed` with its data root on S3, where both nodes embed and nothing is written to
local disk, and `rayclip index`, whose steps as Ray tasks on both nodes build what one process
builds. One cluster serves both commands (`two_nodes`: helpers/multinode.py, in a subprocess, so it
does not share the session's Ray)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import bounded
from helpers.index_builds import (
    ANCHORS,
    FILES,
    INDEX_TYPE,
    PART_VECTORS,
    PER_FILE,
    REFERENCE,
    open_build,
    search,
    write_day_files,
)
from helpers.s3_proxy import S3_BUCKET
from helpers.silver import clustered
from helpers.site import GOOD_IMAGES
from helpers.stores import copy_in, read_silver

from rayclip.stages import index
from rayclip.store import catalog, layout, storage


@dataclass(frozen=True)
class TwoNodes:
    embedded: object  # the S3 data root `rayclip embed` ran on (a copy of the ingested root)
    built: Path  # the local data root `rayclip index` ran on (made-up vectors in four silver files)
    cwd: Path  # the helper's working folder
    scratch: Path  # its TMPDIR, which every process of the cluster inherits
    found: dict  # what the helper printed (helpers/multinode.py)


@pytest.fixture(scope="module")
def two_nodes(s3_server, ingested, tmp_path_factory):
    embedded = storage.data_root(f"s3://{S3_BUCKET}/two-nodes-{uuid.uuid4().hex[:12]}")
    copy_in(ingested, embedded)
    built = tmp_path_factory.mktemp("two-nodes") / "data"
    write_day_files(built)
    cwd = tmp_path_factory.mktemp("cwd")
    # Short: Ray's sockets live under it, and a Unix socket path is limited to about 100 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="rc-"))
    helper = Path(helpers.__file__).with_name("multinode.py")
    cmd = [sys.executable, str(helper), storage.uri(embedded), str(built), INDEX_TYPE, str(PART_VECTORS)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(scratch)}
    for name in ("RAY_ADDRESS", "RAY_TMPDIR"):
        env.pop(name, None)
    try:
        done = bounded.run(cmd, 600, cwd=cwd, env=env, capture_output=True, text=True)  # in a test of 900 s
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield TwoNodes(embedded, built, cwd, scratch, json.loads(done.stdout.splitlines()[-1]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_data_file(path: Path) -> bool:
    """An image, Parquet, a lease, a model file, or a record named by a run (commit or run record, log)."""
    named_by_run = re.match(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}", path.name) is not None
    return path.suffix in {".parquet", ".jpg", ".png"} or path.name in {".lease", "_model.json"} or named_by_run


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's run: a two-node cluster's start, an embed and a build, under load
def test_two_node_cluster_on_s3_writes_nothing_to_local_disk(two_nodes):
    """Both nodes embed, and neither the working folder nor TMPDIR holds a data file after. Every
    process of the cluster inherits TMPDIR: Ray keeps its session folder (each node's scratch) there,
    and the actors' own temp files go there."""
    run, scratch = two_nodes.found["run"], two_nodes.scratch
    assert run["cluster_cpus"] == 2.0 and run["rows_embedded"] == GOOD_IMAGES
    assert run["actors_used"] == 2 and run["nodes_used"] == 2
    assert read_silver(two_nodes.embedded, REFERENCE).num_rows == GOOD_IMAGES
    assert Path(two_nodes.found["session_dir"]).is_relative_to(scratch)  # the cluster did take TMPDIR
    temps = two_nodes.found["actor_temp_dirs"]
    assert temps and all(Path(d).is_relative_to(scratch) for d in temps)
    local = [p for folder in (two_nodes.cwd, scratch) for p in folder.rglob("*") if is_data_file(p)]
    assert local == [] and not (two_nodes.cwd / "data").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_build_equals_the_single_process_build(two_nodes, ray_session):
    """The CLI on two nodes builds one file; the forms on disk and in shards are built from the same
    steps on the session's cluster (one node), in this process."""
    root = two_nodes.built
    distributed = {"single": two_nodes.found["single"]}
    on_ray = {"index_type": INDEX_TYPE, "part_vectors": PART_VECTORS, "parallel": "ray", "retrain": True}
    distributed["ondisk"] = index.build(root, **on_ray, on_disk=True).build_id
    distributed["shards"] = index.build(root, **on_ray, shards=2).build_id
    nodes = {"single": 2, "ondisk": 1, "shards": 1}

    local = index.build(root, index_type=INDEX_TYPE, part_vectors=PART_VECTORS, parallel="local", retrain=True)
    opened = open_build(root, local.build_id)
    expected_index, _, expected = opened
    assert expected.steps == {
        "parts": 4,
        "part_vectors": PART_VECTORS,
        "ran_on": "local",
        "nodes": 1,
        "task_peak_rss_mib": None,
        "auto": None,
    }
    queries = clustered(1000, seed=0)  # fresh points around the same centres
    stored = clustered(FILES * PER_FILE)[ANCHORS]  # faiss_id i is silver row i: ids are global, not per part
    want_scores, want_ids = search(opened, expected.search_params, queries)
    mapping = catalog.read_parquet(layout.mapping_file(layout.build_dir(root, REFERENCE, local.build_id)))

    for form, build_id in distributed.items():
        opened = open_build(root, build_id)
        found_index, _, info = opened
        assert info.form == form and info.steps["ran_on"] == "ray" and info.steps["nodes"] == nodes[form], info.steps
        assert len(info.steps["task_peak_rss_mib"]["add"]) == 4  # one add task per part
        assert found_index.ntotal == expected_index.ntotal == FILES * PER_FILE
        assert search(opened, {"nprobe": 32}, stored)[1][:, 0].tolist() == ANCHORS
        assert info.search_params == expected.search_params and info.recall == expected.recall
        scores, ids = search(opened, expected.search_params, queries)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        # Same ids, but for exact ties: shards merge their top-k in their own order, so two vectors with
        # one score (SQ8 codes collide) may swap, or trade the k-th place: a differing id has the same
        # score, to the float rounding of sums grouped otherwise.
        differ = ids != want_ids
        assert differ.sum() <= 5 and np.allclose(scores[differ], want_scores[differ], rtol=0, atol=1e-6), form
        # faiss_id i names the same media_id in both: ids are positions, not the order tasks finished in
        found = catalog.read_parquet(layout.mapping_file(layout.build_dir(root, REFERENCE, build_id)))
        assert found.select(["faiss_id", "media_id"]).equals(mapping.select(["faiss_id", "media_id"]))
    shards = catalog.build_info(root, REFERENCE, distributed["shards"]).shards
    assert shards == [
        {"file": "shard-00000.faiss", "first": 0, "count": 3200},
        {"file": "shard-00001.faiss", "first": 3200, "count": 2800},
    ]
