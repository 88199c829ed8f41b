"""`rayclip serve --ray`: a build kept in 2 shards behind Ray Serve (a deployment per shard, the app
as the ingress) answers every query route as the unsharded build served in one process does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.index_forms import (
    WholeAndSharded,
    query_answers,
    scores_within_rounding,
    whole_and_sharded,
    without_build_ids,
)
from helpers.ports import free_port

from rayclip.http import ray_serve
from rayclip.http.app import create_app

API_KEY = "shard-key"


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> WholeAndSharded:
    return whole_and_sharded(tmp_path_factory.mktemp("ray-serve"))


@dataclass(frozen=True)
class Served:
    client: httpx.Client  # on the ingress's loopback port
    shards: int  # how many shard deployments serve the build


def test_replicas_the_cluster_cannot_place_are_one_line_at_the_timeout(roots, ray_session):
    """Serve waits for ever for a replica no node has room for; deploy gives up at its timeout, says
    what was asked and what is free, and takes Serve down again. (First in the module: the module's
    own deployment starts with the next test.)"""
    from ray.util import placement_group, remove_placement_group

    from rayclip.errors import UserError

    held = placement_group([{"CPU": ray_session.cluster_resources()["CPU"] - 0.1}])  # no shard replica fits
    try:
        ray_session.get(held.ready(), timeout=30)  # else something left from an earlier test holds CPUs
        started = time.monotonic()
        with pytest.raises(UserError) as refused:
            ray_serve.deploy(roots.sharded_root, host="127.0.0.1", port=free_port(), deploy_timeout=3)
        assert time.monotonic() - started < 60
    finally:
        remove_placement_group(held)
    assert re.fullmatch(
        r"--ray: Ray Serve did not start rayclip-shard-00000 within 3 s "
        r"\(a shard replica asks 0.25 CPU, the ingress 0.5; 0.1 CPU free in the cluster(; .+)?\)",
        str(refused.value),
    ), refused.value
    assert "SERVE_CONTROLLER_ACTOR" not in {a["name"] for a in ray_session.util.list_named_actors(all_namespaces=True)}


@pytest.fixture(scope="module")
def served(roots, ray_session) -> Served:
    """One Serve deployment of the sharded build for the module, on a loopback port, with an API key."""
    port = free_port()
    shards = ray_serve.deploy(roots.sharded_root, host="127.0.0.1", port=port, replicas=2, api_key=API_KEY, mmap=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Served(client, shards)
    finally:
        ray_serve.shutdown()


def a_media_id(root) -> str:
    from rayclip.query.searcher import Searcher

    return Searcher.open(root).mapping.table.column("media_id")[7].as_py()


def test_two_shards_behind_ray_serve_answer_as_the_unsharded_build(roots, served):
    client = served.client
    assert served.shards == 2
    media_id = a_media_id(roots.root)
    unsharded = scores_within_rounding(without_build_ids(query_answers(TestClient(create_app(roots.root)), media_id)))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert without_build_ids(query_answers(client, media_id, **auth)) == unsharded
    assert client.get("/api/search", params={"q": "a dog"}).status_code == 401  # the key still guards the API
    assert client.get("/api/status", headers=auth).json()["form"] == "shards"


def test_each_shard_runs_its_replicas(served):
    from ray import serve

    applications = serve.status().applications
    running = [
        applications[ray_serve.SHARD_APP.format(k)].deployments[ray_serve.SHARD_DEPLOYMENT].replica_states
        for k in range(served.shards)
    ]
    assert running == [{"RUNNING": 2}] * 2


def test_a_build_published_while_served_is_answered_by_its_own_shards(roots, served):
    """The ingress serves the build CURRENT names from the next request on, and each shard replica
    loads that build's shard when first asked: the new build splits its rows at another place
    (parts of 1,500: shards of 3,000 and 1,000 rows), so a replica still holding the old shard
    would answer with rows of the other shard's range."""
    from helpers.index_forms import rebuild

    from rayclip.store import catalog, storage

    client = served.client
    auth = {"Authorization": f"Bearer {API_KEY}"}
    media_id = a_media_id(roots.root)
    old = query_answers(client, media_id, **auth)["search"]["build_id"]
    [model_version] = catalog.gold_model_versions(storage.data_root(roots.sharded_root))
    built = rebuild(roots.sharded_root, model_version, old, shards=2, part_vectors=1500)
    after = query_answers(client, media_id, **auth)
    assert {a["build_id"] for a in after.values() if isinstance(a, dict)} == {built}
    in_one_process = TestClient(create_app(roots.sharded_root))
    assert [s.ntotal for s in in_one_process.app.state.service.searcher().snapshot().knn.shards] == [3000, 1000]
    assert after == scores_within_rounding(query_answers(in_one_process, media_id))


def serve_ray(root, *, without_serve: bool = False, **env) -> subprocess.CompletedProcess:
    """`rayclip serve --ray` in a fresh process (Ray Serve made unimportable when asked)."""
    hide = "sys.modules['ray.serve'] = None; " if without_serve else ""
    script = f"import sys; {hide}from rayclip.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "serve", "--ray", "--data-dir", str(root), "--port", str(free_port())]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ | env)


def test_without_ray_serve_ray_is_one_line(roots):
    run = serve_ray(roots.sharded_root, without_serve=True)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        "rayclip serve: error: --ray needs Ray Serve: pip install 'rayclip[serve]'"
    ]


def test_an_unreachable_cluster_is_one_line(roots):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    run = serve_ray(roots.sharded_root, RAY_ADDRESS=address)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        f"rayclip serve: error: --ray: no Ray cluster reachable at $RAY_ADDRESS {address} (Connection refused)"
    ]
