"""The whole pipeline on an S3 data root (moto's S3 API on loopback) gives what it gives locally,
through a throttling store, and writes nothing to the local disk while it runs.

One run serves every test here (`s3_pipeline`): `rayclip ingest`, `embed` (starting its own Ray) and
`index` on a fresh S3 root, in a process tree watched by strace (tests/helpers/watch.py) with 5 % of
every request (HEAD, GET, PUT, LIST, POST) spoilt, every fault kind of s3_proxy drawn (503 SlowDown,
500, reset, an answer cut short); then search in Python and through the HTTP service, from empty local
folders. On the same generated images as the local gold store (`gold_store`): the same media_ids, the
same silver vectors, the same search results, and the server answers from S3.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import watch
from helpers.bronze import check_objects, downloads, manifest_rows, objects
from helpers.s3_proxy import FAULTS, S3_BUCKET
from helpers.site import GOOD_IMAGES
from helpers.stores import assert_rows_are_open_clips, cli, read_silver

from rayclip import Searcher, model
from rayclip.http.app import create_app
from rayclip.stages import embed
from rayclip.stages.ingest.download import SCRATCH_PREFIX
from rayclip.store import catalog, layout, storage

REFERENCE = "clip_rayclip_ref_reference"
QUERIES = ["a large red circle on the left on a white background", "a small blue star", "a green triangle"]


@dataclass(frozen=True)
class S3Pipeline:
    root: object  # the data root on S3 (a Location)
    watched: watch.Watched  # what the CLI's processes wrote locally while they ran
    local: dict[str, Path]  # the empty folders the searches and the server ran in
    found: list  # Searcher.search_text's results per query
    served: list  # /api/search's results per query
    spoilt: dict  # (method, fault) -> requests the proxy spoilt


@pytest.fixture(scope="module")
def s3_pipeline(s3_server, metadata, tmp_path_factory) -> S3Pipeline:
    from fastapi.testclient import TestClient

    root = storage.data_root(f"s3://{S3_BUCKET}/pipeline-{os.getpid()}")
    url, rayclip = storage.uri(root), f"{sys.executable} -m rayclip.cli"
    steps = [
        f"{rayclip} ingest --data-dir {url} --metadata {metadata} --timeout 3",
        f"{rayclip} embed --data-dir {url} --pretrained reference --actors 1 --batch-size 8",
        f"{rayclip} index --data-dir {url}",
    ]
    s3_server.throttle(0.05, seed=25)
    try:
        watched = watch.run_watched(steps, tmp_path_factory.mktemp("trace") / "t", timeout=800)
        with watch.empty_local_folders(tmp_path_factory.mktemp("s3-run")) as local:
            found = [Searcher.open(root).search_text(query, k=5) for query in QUERIES]
            with TestClient(create_app(url)) as client:  # serve: opens the build from the store at start
                served = [client.get("/api/search", params={"q": q, "k": 5}).json()["results"] for q in QUERIES]
        spoilt = dict(s3_server.spoilt)
    finally:
        s3_server.clean()
    return S3Pipeline(root, watched, local, found, served, spoilt)


# Outside the folders the run was pointed at, only memory and devices: /dev/shm is a tmpfs (Ray's
# object store keeps its objects there, Python's multiprocessing its semaphores), /proc (Ray sets its
# workers' oom_score_adj), the rest device nodes.
ALLOWED_OUTSIDE = ("/dev/shm/", "/dev/null", "/dev/tty", "/dev/pts/", "/proc/")
PROBE = re.compile(r"[a-z0-9_]{8}")  # tempfile's candidate names


@pytest.mark.slow
@pytest.mark.timeout(900)  # the module's run: three commands under strace, one starting Ray
@pytest.mark.skipif(watch.STRACE is None, reason="strace is missing (`make test` installs Debian's strace as root)")
def test_the_pipeline_writes_nothing_to_local_disk_while_it_runs(s3_pipeline):
    """Every file any process of ingest, embed and index wrote, watched while they ran. Inside the
    folders they were pointed at, files only in Ray's session folder (RAY_TMPDIR/ray/session_*: logs,
    sockets, ports), Ray's token ($HOME/.ray/auth_token) and Python's probe of TMPDIR (removed at
    once); the rest is empty folders (wandb's, which img2dataset imports, the download's scratch
    TMPDIR, and torch's compile cache's)."""
    watched, given = s3_pipeline.watched, s3_pipeline.watched.folders_given
    assert catalog.current_build(s3_pipeline.root, REFERENCE)  # the run did its work, on S3
    outside = sorted(
        p
        for p in watched.files | watched.folders
        if not Path(p).is_relative_to(watched.base) and not p.startswith(ALLOWED_OUTSIDE)
    )
    assert outside == [], outside[:40]
    ray_files = [p for p in watched.files if Path(p).is_relative_to(given["ray"])]
    assert any("/session_" in p for p in ray_files)  # Ray's session folder: watched, and there
    # Python's check that TMPDIR is writable (tempfile.gettempdir, once per process): a file named by 8
    # random letters, written and removed at once; img2dataset's processes check their scratch TMPDIR.
    probes = [p for p in watched.files if in_a_tmpdir(Path(p), given["tmp"]) and PROBE.fullmatch(Path(p).name)]
    assert not set(probes) & watched.left
    others = sorted(p for p in watched.files if Path(p).is_relative_to(watched.base) and p not in ray_files + probes)
    assert set(others) <= {str(given["home"] / ".ray" / "auth_token")}, others[:40]


def in_a_tmpdir(path: Path, tmp: Path) -> bool:
    """Whether `path` is directly in TMPDIR, or in the scratch TMPDIR an ingest gives img2dataset."""
    folder = path.parent
    return folder == tmp or (folder.parent == tmp and folder.name.startswith(SCRATCH_PREFIX))


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_every_layer_is_on_s3_and_nothing_on_the_local_disk(s3_pipeline):
    root, local = s3_pipeline.root, s3_pipeline.local
    assert catalog.read_manifest(root).num_rows > 0
    assert catalog.silver_files(root, REFERENCE)
    assert catalog.silver_files(root, REFERENCE, table=layout.CAPTIONS)  # embed's caption vectors, on the store too
    assert catalog.current_build(root, REFERENCE) in catalog.builds(root, REFERENCE)
    assert catalog.build_info(root, REFERENCE, catalog.current_build(root, REFERENCE)).captions["count"] > 0
    assert files_under(local["cwd"]) == [] and files_under(local["tmp"]) == []


def test_a_throttled_store_gives_what_a_clean_one_gives(s3_pipeline, gold_store):
    """`s3_pipeline` ran ingest, embed, index, search and serve with 5 % of the requests spoilt: 503
    SlowDown, 500, reset connections and answers cut short, on every verb."""
    root, spoilt = s3_pipeline.root, s3_pipeline.spoilt
    found = [[(r.media_id, r.score) for r in results] for results in s3_pipeline.found]
    served = s3_pipeline.served
    methods = {method for method, _ in spoilt}
    assert methods >= {"HEAD", "GET", "PUT"} and sum(spoilt.values()) >= 10, (
        spoilt
    )  # the store did throttle (POST: a build deletes its parts)
    assert {fault for _, fault in spoilt} == set(FAULTS), spoilt
    here = gold_store.root  # the same site and model on a clean local root (test_gold_s3: = a clean S3 root)
    assert sorted(catalog.read_manifest(root).column("media_id").to_pylist()) == sorted(
        catalog.read_manifest(here).column("media_id").to_pylist()
    )
    on_s3, local = read_silver(root, REFERENCE), read_silver(here, REFERENCE)
    by_id = dict(zip(local.column("media_id").to_pylist(), local.column("embedding").to_pylist()))
    assert sorted(on_s3.column("media_id").to_pylist()) == sorted(by_id)
    for media_id, vector in zip(on_s3.column("media_id").to_pylist(), on_s3.column("embedding").to_pylist()):
        assert np.allclose(vector, by_id[media_id], atol=1e-5)
    clean = Searcher.open(here)
    for query, got in zip(QUERIES, found):
        want = clean.search_text(query, k=5)
        assert [m for m, _ in got] == [r.media_id for r in want]
        assert [s for _, s in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert [[r["media_id"] for r in results] for results in served] == [[m for m, _ in got] for got in found]


def test_the_ingest_on_s3_made_the_local_ones_decisions(s3_pipeline, ingested, site):
    """The same metadata as conftest's local `ingested`: the same report, rows and objects."""
    root = s3_pipeline.root
    [(_, _, report)] = [run for run in catalog.run_records(root) if run[0] == "ingest"]
    [(_, _, local)] = catalog.run_records(ingested)
    assert (report["stored"], report["admitted"], report["duplicates"]) == (GOOD_IMAGES, GOOD_IMAGES + 1, 1)
    assert report["failed"] == local["failed"]
    assert manifest_rows(root) == manifest_rows(ingested)
    # Two URLs with the same bytes: one object, two rows.
    assert len(objects(root)) == GOOD_IMAGES
    first = site.images.column("filename")[0].as_py()
    twins = [r for r in catalog.read_manifest(root).to_pylist() if r["url"].endswith(("/" + first, "/dup.jpg"))]
    assert len(twins) == 2 and twins[0]["media_id"] == twins[1]["media_id"]
    check_objects(root)
    assert downloads(root) == []  # the work folder is gone with its run


def test_the_embed_on_s3_is_open_clips_committed_once_and_reruns_as_nothing(s3_pipeline, ingested, ray_session):
    root = s3_pipeline.root
    [run] = [r for stage, _, r in catalog.run_records(root) if stage == "embed"]
    assert "ActorPoolMapOperator[MapBatches(EmbedUDF)]" in run["plan"]
    assert run["rows_embedded"] == GOOD_IMAGES and run["rows_failed"] == 0
    assert catalog.silver_model(root, REFERENCE)["model_version"] == REFERENCE
    table = read_silver(root, REFERENCE)
    ids = table.column("media_id").to_pylist()
    manifest_ids = catalog.read_manifest(root, ["media_id"]).column("media_id").to_pylist()
    assert len(manifest_ids) > GOOD_IMAGES  # the same bytes under two URLs: one manifest row each
    assert len(ids) == len(set(ids)) == GOOD_IMAGES and set(ids) == set(manifest_ids)
    # The vectors are open_clip's own for the bytes (read here from the local copy of the same objects).
    assert_rows_are_open_clips(ingested, table)
    # One commit record names every file the run wrote; the run's work folder is gone.
    [record] = catalog.silver_commits(root, REFERENCE)
    written = storage.glob(layout.embeddings_dir(root), "*/dt=*/*.parquet")
    assert record["rows"] == GOOD_IMAGES and catalog.silver_files(root, REFERENCE) == written
    assert storage.glob(root, "silver/_work/*") == []

    rerun = embed.embed(storage.uri(root), model.resolve(None, "reference"), actors=1, batch_size=8)  # a URL
    assert (rerun.rows_planned, rerun.rows_embedded) == (0, 0)
    assert len(catalog.silver_commits(root, REFERENCE)) == 1 and read_silver(root, REFERENCE).equals(table)


def test_same_media_ids_and_silver_vectors_as_local(s3_pipeline, gold_store):
    root = s3_pipeline.root
    local_root = gold_store.root
    assert sorted(catalog.read_manifest(root).column("media_id").to_pylist()) == sorted(
        catalog.read_manifest(local_root).column("media_id").to_pylist()
    )
    on_s3, here = read_silver(root, REFERENCE), read_silver(local_root, REFERENCE)
    by_id = dict(zip(here.column("media_id").to_pylist(), here.column("embedding").to_pylist()))
    assert sorted(on_s3.column("media_id").to_pylist()) == sorted(by_id)
    for media_id, vector in zip(on_s3.column("media_id").to_pylist(), on_s3.column("embedding").to_pylist()):
        assert np.allclose(vector, by_id[media_id], atol=1e-5)


def test_same_search_results_as_local(s3_pipeline, gold_store):
    root = s3_pipeline.root
    on_s3, here = Searcher.open(root), Searcher.open(gold_store.root)
    for query in QUERIES:
        got, want = on_s3.search_text(query, k=5), here.search_text(query, k=5)
        assert [r.media_id for r in got] == [r.media_id for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)


def test_search_cli_on_s3(s3_pipeline, capsys):
    root = s3_pipeline.root
    capsys.readouterr()
    assert cli("search", "--data-dir", storage.uri(root), "--q", QUERIES[0], "--k", "3", "--json") == 0
    results = json.loads(capsys.readouterr().out)
    want = Searcher.open(root).search_text(QUERIES[0], k=3)
    assert [r["media_id"] for r in results] == [r.media_id for r in want]


def test_server_answers_and_streams_images_from_s3(s3_pipeline):
    from fastapi.testclient import TestClient

    root = s3_pipeline.root
    client = TestClient(create_app(root))
    hits = client.get("/api/search", params={"q": QUERIES[1], "k": 3}).json()["results"]
    assert len(hits) == 3
    row = next(r for r in catalog.read_manifest(root).to_pylist() if r["media_id"] == hits[0]["media_id"])
    image = client.get(f"/api/images/{row['media_id']}")
    assert image.status_code == 200 and image.content == storage.read_bytes(root / row["path"])
