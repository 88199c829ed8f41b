"""kill -9 inside every commit window (named fault points, `$RAYCLIP_KILL_AT`), then: no reader sees a
partial layer, the debris is reported and swept, and a rerun finishes with exact counts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.kills import assert_killed, rayclip
from helpers.site import GOOD_IMAGES
from helpers.stores import status

from rayclip import Searcher
from rayclip.stages import index
from rayclip.store import catalog, layout, storage
from rayclip.store.storage import leases

REFERENCE = "clip_rayclip_ref_reference"


# ---------------------------------------------------------------- embed


def silver_rows(root: Path) -> pa.Table:
    """What any silver reader sees: every committed file must read whole."""
    files = catalog.silver_files(root, REFERENCE)
    return (
        pa.concat_tables(pq.read_table(f) for f in files)
        if files
        else pa.table({"media_id": pa.array([], pa.string())})
    )


@pytest.mark.slow
@pytest.mark.timeout(900)  # two embed runs and a subprocess start under load
def test_embed_driver_killed_while_ray_writes(store, ray_session, capsys):
    """No named point can stop the driver inside Ray's write, so the test kills it from outside as
    soon as the first file lands, and checks that the run had not finished. Both runs are the CLI on
    the cluster $RAY_ADDRESS names (the session's own): the same command, unchanged, joins a cluster."""
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(store), "--pretrained", "reference"]
    cmd += ["--actors", "1"]
    proc = subprocess.Popen(
        cmd + ["--batch-size", "1", "--blocks", str(GOOD_IMAGES)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(store.glob("silver/**/*.parquet")):
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(layout.embed_runs_dir(store).glob("*.json")), "the run finished before the kill"
    assert silver_rows(store).num_rows == 0 and not catalog.silver_files(store, REFERENCE)
    assert list(store.glob("silver/embeddings/*/dt=*/*.parquet")), "killed before Ray wrote anything"
    assert status(store, capsys)["debris"]  # the dead run's files and work folder

    done = subprocess.run(
        cmd + ["--batch-size", "8", "--no-captions"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = [json.loads(p.read_text()) for p in layout.embed_runs_dir(store).glob("*.json")]
    assert run["cluster"] == env["RAY_ADDRESS"] and run["rows_embedded"] == GOOD_IMAGES
    assert silver_rows(store).num_rows == GOOD_IMAGES
    assert status(store, capsys)["debris"] == []


# ---------------------------------------------------------------- index


@dataclass(frozen=True)
class GoldCopy:
    root: Path  # a copy of the gold store's data root, this test's own
    published: str  # the build_id its CURRENT names


@pytest.fixture
def gold_copy(gold_store, tmp_path) -> GoldCopy:
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    return GoldCopy(root, gold_store.build.build_id)


@pytest.mark.parametrize("point", ["index.build", "index.publish"])
def test_index_killed_during_build_and_before_current(gold_copy, capsys, point):
    root, published = gold_copy.root, gold_copy.published
    assert_killed(*rayclip("index", "--data-dir", str(root), kill_at=point))

    # Readers still get the build CURRENT named before, whole.
    assert catalog.current_build(root, REFERENCE) == published
    searcher = Searcher.open(root)
    assert searcher.build_info.build_id == published and searcher.build_info.count == GOOD_IMAGES
    assert len(searcher.search_text("a red circle", k=GOOD_IMAGES)) == GOOD_IMAGES
    debris = [d["path"] for d in status(root, capsys)["debris"]]
    if point == "index.build":  # a half-written folder without build.json: not a build, reported as debris
        assert catalog.builds(root, REFERENCE) == [published]
        assert len(debris) == 1 and debris[0].startswith(f"gold/{REFERENCE}/builds/")
    else:  # a complete build that was never named: listed (rollback-able), not debris
        assert len(catalog.builds(root, REFERENCE)) == 2 and debris == []

    rerun = index.build(root)
    assert rerun.count == GOOD_IMAGES and catalog.current_build(root, REFERENCE) == rerun.build_id
    assert Searcher.open(root).build_info.build_id == rerun.build_id
    assert status(root, capsys)["debris"] == []


PARTS = {"index_type": "IVF16,SQ8", "part_vectors": 1000, "retrain": True}  # three parts over 3,000 vectors


def flags(options: dict) -> list[str]:
    """--name value for each option (True: the bare flag)."""
    named = [[f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)]) for k, v in options.items()]
    return [word for flag in named for word in flag]


# Each step of a build in parts, with the options that give it another shape; the last kills the Ray
# task that adds a part, not the command.
WINDOWS = [
    ("index.select", {}),
    ("index.train", {}),
    ("index.add", {}),
    ("index.merge", {}),
    ("index.merge", {"on_disk": True}),
    ("index.merge", {"shards": 2}),
    ("index.map", {}),
    ("index.add", {"parallel": "ray"}),
]
KILLED_RUN_S = 120  # each killed command's own bound, within the test's


@pytest.mark.parametrize("on", ["local", "s3"])
@pytest.mark.timeout(len(WINDOWS) * KILLED_RUN_S + 300)
def test_index_killed_in_each_step_of_a_build_in_parts(request, tmp_path, capsys, monkeypatch, on):
    """Each step of a build in parts killed in turn, each run on top of what the last left, on a local
    folder and on S3: CURRENT stays, readers see the old build, each killed run's folder is debris (on
    S3 once its lease is stale; when a Ray task dies, removed by the failing command; locally the next
    build sweeps the last one's, its flock dead), and a rerun publishes and leaves no debris."""
    from helpers.silver import clustered, media_ids, write_manifest, write_silver

    root = tmp_path / "data" if on == "local" else request.getfixturevalue("s3_root")
    ids, vectors = media_ids(3000), clustered(3000)
    for day in range(3):
        rows = slice(day * 1000, (day + 1) * 1000)
        write_silver(root, f"2026-01-0{day + 1}", ids[rows], vectors[rows])
    write_manifest(root, ids)
    published = index.build(root, index_type="IVF16,SQ8", parallel="local").build_id

    debris: set[str] = set()
    for point, shape in WINDOWS:
        monkeypatch.undo()  # leases go stale at their own pace again: the next run's is live
        options = {"parallel": "local"} | shape
        on_ray = options["parallel"] == "ray"
        joined = None
        if on_ray:  # the session's cluster, joined as any cluster is ($RAY_ADDRESS); the kill reaches its task
            joined = {"RAY_ADDRESS": request.getfixturevalue("ray_session").get_runtime_context().gcs_address}
        args = ["--data-dir", storage.uri(root), *flags(PARTS | options)]
        rc, out = rayclip("index", *args, kill_at=point, env=joined, timeout=KILLED_RUN_S)
        if on_ray:  # the driver sees its task die and fails the build
            assert rc == 1 and "WorkerCrashedError" in out, out[-2000:]
        else:
            assert_killed(rc, out)

        assert catalog.current_build(root, REFERENCE) == published and catalog.builds(root, REFERENCE) == [published]
        assert Searcher.open(root).build_info.build_id == published
        if on == "s3":  # a fresh lease may be a build alive on another machine: not debris until it is stale
            assert status(root, capsys)["debris"] == []
            monkeypatch.setattr(leases, "LEASE_STALE_S", 0.0)
        listed = {d["path"] for d in status(root, capsys)["debris"]}
        left = listed - debris  # (a build sweeps the debris it finds dead: locally, the last run's)
        assert len(left) == (0 if on_ray else 1) and all(p.startswith(f"gold/{REFERENCE}/builds/") for p in left)
        debris = listed

    rerun = index.build(root, **PARTS | {"parallel": "local"})  # the same build, in this process
    assert catalog.current_build(root, REFERENCE) == rerun.build_id and rerun.count == 3000
    assert status(root, capsys)["debris"] == []
