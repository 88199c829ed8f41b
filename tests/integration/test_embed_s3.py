"""Embedding with the data root on an object store (moto's S3 on loopback): the local tests'
assertions, a two-node cluster that writes nothing to local disk, and the streaming planner against
the planner it replaced (the kill inside the commit, on both stores: test_kill_points.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pytest
from helpers import bounded
from helpers.silver import media_ids, write_manifest, write_silver
from helpers.site import GOOD_IMAGES
from helpers.stores import copy_in, read_silver

from rayclip.stages import embed
from rayclip.store import catalog, layout, storage

REFERENCE = "clip_rayclip_ref_reference"
DAY = "2026-01-01"


@pytest.fixture
def s3_store(ingested, s3_root):
    """The ingested local data root copied, byte for byte, into a fresh S3 root."""
    copy_in(ingested, s3_root)
    return s3_root


def partition_files(root) -> list[str]:
    """Every Parquet file under silver's partitions, committed or not."""
    return [str(f) for f in storage.glob(layout.embeddings_dir(root), "*/dt=*/*.parquet")]


def committed_files(root) -> list[str]:
    return [str(f) for f in catalog.silver_files(root, REFERENCE)]


def is_data_file(path: Path) -> bool:
    """An image, Parquet, a lease, a model file, or a record named by a run (commit or run record, log)."""
    named_by_run = re.match(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}", path.name) is not None
    return path.suffix in {".parquet", ".jpg", ".png"} or path.name in {".lease", "_model.json"} or named_by_run


@pytest.mark.slow
@pytest.mark.timeout(600)  # a two-node cluster's start and an embed, under load: its subprocess gets 400 s
def test_two_node_cluster_on_s3_writes_nothing_to_local_disk(s3_store, tmp_path):
    """Two raylets with 1 CPU each, the data root on S3: both nodes embed, and neither the working
    folder nor TMPDIR holds a data file after. Every process of the cluster inherits TMPDIR: Ray keeps
    its session folder (each node's scratch) there, and the actors' own temp files go there."""
    helper = Path(helpers.__file__).with_name("multinode_embed.py")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Short: Ray's sockets live under it, and a Unix socket path is limited to about 100 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="rc-"))
    cmd = [sys.executable, str(helper), storage.uri(s3_store)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "TMPDIR": str(scratch)}
    env.pop("RAY_TMPDIR", None)
    try:
        done = bounded.run(cmd, 400, cwd=cwd, env=env, capture_output=True, text=True)  # in a test of 600 s
        assert done.returncode == 0 and "{" in done.stdout, done.stdout[-1000:] + done.stderr[-3000:]
        out = json.loads(done.stdout.splitlines()[-1])  # the helper's line, after what `rayclip embed` printed
        run = out["run"]
        assert run["cluster_cpus"] == 2.0 and run["rows_embedded"] == GOOD_IMAGES
        assert run["actors_used"] == 2 and run["nodes_used"] == 2
        assert read_silver(s3_store, REFERENCE).num_rows == GOOD_IMAGES
        assert Path(out["session_dir"]).is_relative_to(scratch)  # the cluster did take TMPDIR
        assert out["actor_temp_dirs"] and all(Path(d).is_relative_to(scratch) for d in out["actor_temp_dirs"])
        local = [p for folder in (cwd, scratch) for p in folder.rglob("*") if is_data_file(p)]
        assert local == [] and not (cwd / "data").exists()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("planner", ["in the driver", "streaming"])
def test_both_planners_plan_the_same_rows(tmp_path, ray_session, monkeypatch, planner):
    """Duplicated manifest rows, some ids already embedded: each planner
    gives one row per new media_id with its smallest path, in media_id order, and --limit takes the
    smallest media_ids."""
    if planner == "streaming":
        monkeypatch.setattr(embed.plan, "DRIVER_PLAN_ROWS", 0)
        monkeypatch.setattr(embed.plan, "_plan_in_driver", None)  # never called
    root = tmp_path / "data"
    ids = media_ids(300)
    write_manifest(root, ids[:200], seed=0)
    write_manifest(root, ids[150:] + ids[:20], seed=1)  # 150..199 and 0..19 twice
    write_silver(root, "2026-01-01", ids[100:180], np.eye(80, 128))
    write_silver(root, "2026-01-02", ids[250:260], np.eye(10, 128))

    done = set(ids[100:180] + ids[250:260])
    smallest: dict[str, str] = {}
    for row in catalog.read_manifest(root, ["media_id", "path"]).to_pylist():
        if row["media_id"] not in done:
            smallest[row["media_id"]] = min(smallest.get(row["media_id"], row["path"]), row["path"])
    expected = [{"media_id": m, "path": smallest[m]} for m in sorted(smallest)]

    def planned(**kwargs) -> list[dict]:
        work = embed.plan_work(root, REFERENCE, **kwargs)
        return pa.concat_tables(work.iter_batches(batch_format="pyarrow", batch_size=None)).to_pylist()

    assert planned() == expected
    assert len(expected) == 300 - 90
    assert planned(limit=7) == expected[:7]
    assert len(planned(force=True)) == 300
