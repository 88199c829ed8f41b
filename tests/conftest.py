"""The fixtures the tests share: a loopback image site and LAION-style metadata pointing at it, the
ingested store, one Ray per test process, moto's S3 behind a throttling proxy, and the gold store
built once per run. Helpers (plain functions and constants) are in the `helpers` package: a test
module imports those, never this file or another test module."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.built_once import built_once
from helpers.clip_retrieval import serving_live
from helpers.ports import lasting_port
from helpers.s3_proxy import S3_BUCKET, ThrottlingProxy
from helpers.site import GOOD_IMAGES, Site, SiteHandler, huge_png_header, serve
from helpers.stores import GoldStore, run_ingest

from rayclip import synthetic


def pytest_configure(config: pytest.Config) -> None:
    # The object-store tests talk to moto's S3 on loopback, found through the standard AWS variables.
    # They are set when the test session starts, so every process it starts later (Ray's workers, CLI
    # subprocesses) finds the same endpoint, as a real deployment's processes find theirs. Its server
    # starts later (the first test that needs it): the port must stay free until then.
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{lasting_port()}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    # Nothing leaves loopback: Ray's usage reporting and albumentations' update check (img2dataset
    # imports it) stay off in this process and every process the tests start, whatever starts them.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1")
    _quick_retries_here()


BOTOCORE_WAIT_SHARE = 0.02  # of botocore's own wait before each retry, in the test processes


def _quick_retries_here() -> None:
    """botocore's waits between retries (a random share of 1, 2, 4 … s) cut to BOTOCORE_WAIT_SHARE
    in the test processes only. The tests that spoil requests count their retries at the proxy, not
    the time between them, and slept through up to 15 s of these waits per file. The processes they
    start (the CLI, Ray's workers, img2dataset's) keep botocore's own waits."""
    from botocore.retries import standard

    own = standard.ExponentialBackoff.delay_amount
    standard.ExponentialBackoff.delay_amount = lambda self, context: BOTOCORE_WAIT_SHARE * own(self, context)


# `make test` runs the files on two xdist workers, one file at a time per worker, in this order: the
# longest first (seconds per file in a 2-core run's --durations), then the rest as collected, so that
# the short ones fill in at the end and both workers finish together. xdist's own order (the most
# tests first, `--no-loadscope-reorder` turns it off) left the longest file, one test, for last.
# test_captions goes second, though shorter: its worker builds the gold store while the other runs
# the S3 pipeline, so that no worker waits on the other's build.
LONGEST_FIRST = (
    "test_object_store.py",
    "test_captions.py",
    "test_kill_points.py",
    "test_faults.py",
    "test_two_nodes.py",
    "test_ops.py",
    "test_embed.py",
    "test_embed_startup.py",
    "test_pipeline.py",
    "test_serve_ray.py",
    "test_storage.py",
    "test_throttle_s3.py",
    "test_eval.py",
    "test_ingest.py",
    "test_openvino.py",
    "test_distributed_index.py",
    "test_gold_s3.py",
    "test_serve_forms.py",
    "test_ingest_s3.py",
    "test_search_features.py",
    "test_clip_back.py",
    "test_eval_formats.py",
    "test_server.py",
    "test_images.py",
    "test_search.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """Generated JPEGs plus the bad bodies the ingest must count and skip."""
    folder = tmp_path_factory.mktemp("site")
    images = synthetic.write_images(folder, GOOD_IMAGES, seed=7)
    first = (folder / images.column("filename")[0].as_py()).read_bytes()
    (folder / "dup.jpg").write_bytes(first)  # same bytes, another URL
    (folder / "truncated.jpg").write_bytes(first[: len(first) // 2])
    (folder / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "huge.png").write_bytes(huge_png_header())
    (folder / "slow.jpg").write_bytes(first)
    with serve(folder) as base:
        yield Site(folder, base, images, SiteHandler.requests)


@pytest.fixture(scope="session")
def metadata(site, tmp_path_factory):
    """LAION-format parquet: URL, TEXT, with good, duplicate and every kind of bad row."""
    base = site.base
    names = site.images.column("filename").to_pylist()
    captions = site.images.column("caption").to_pylist()
    extra = {
        f"{base}/dup.jpg": "the first image again",
        f"{base}/missing.jpg": "404",
        f"{base}/truncated.jpg": "truncated",
        f"{base}/page.jpg": "html",
        f"{base}/empty.jpg": "empty",
        f"{base}/huge.png": "bomb",
        f"{base}/slow.jpg": "slow",
        None: "null url",
        "": "empty url",
        "ftp://127.0.0.1/x.jpg": "ftp",
    }
    urls = [f"{base}/{n}" for n in names] + list(extra)
    texts = captions + list(extra.values())
    path = tmp_path_factory.mktemp("meta") / "meta.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": texts, "similarity": [0.3] * len(urls)}), path)
    return path


@pytest.fixture(scope="session")
def good_metadata(site, tmp_path_factory) -> Path:
    """The site's good images plus one duplicate URL: GOOD_IMAGES objects, GOOD_IMAGES + 1 rows."""
    names = site.images.column("filename").to_pylist()
    urls = [f"{site.base}/{n}" for n in names] + [f"{site.base}/dup.jpg"]
    path = tmp_path_factory.mktemp("good") / "good.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}), path)
    return path


# The session's idle Ray workers are kept for the next test's tasks: by default the raylet kills
# those above one per CPU after a second idle, and each new one costs about a CPU-second to start
# (a whole suite started some 200). Tests only: a user's command starts its cluster once.
KEEP_IDLE_WORKERS = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from rayclip.cluster import LOOPBACK, keep_loopback

    # address="local": a cluster of its own, even when `ray start` (or `rayclip up`) left one running here.
    # Its node on loopback, as cluster.start's: nothing listens beyond it.
    keep_loopback()
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=KEEP_IDLE_WORKERS,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ingested(site, metadata, tmp_path_factory):
    """A data root after one metadata ingest; tests that change it copy it first."""
    root = tmp_path_factory.mktemp("store") / "data"
    run_ingest(root, metadata)
    return root


@pytest.fixture
def store(ingested, tmp_path):
    """A private copy of the ingested data root."""
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API behind a throttling proxy (helpers/s3_proxy.py) on the loopback port
    AWS_ENDPOINT_URL names, with one bucket. The proxy forwards everything untouched until a test
    asks it to spoil a share of the requests (the `s3_proxy` fixture)."""
    import boto3
    from helpers import moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = moto_server.start()
    proxy = ThrottlingProxy(port, server.get_host_and_port())
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield proxy
    proxy.stop()
    server.stop()


@pytest.fixture
def s3_proxy(s3_server):
    """The proxy in front of the S3 server, forwarding untouched again after the test."""
    yield s3_server
    s3_server.clean()


@pytest.fixture
def s3_root(s3_server):
    """A fresh, empty data root on the S3 server."""
    from rayclip.store import storage

    return storage.data_root(f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, worker_id) -> Path:
    """A folder every xdist worker of this run shares (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def gold_store(request, run_dir) -> GoldStore:
    """ingest → embed images and captions (reference model, real Ray) → index, with its caption
    index. Read-only; built once per run, whatever the workers (helpers/built_once.py)."""

    def build(folder: Path) -> GoldStore:
        from rayclip import model
        from rayclip.stages import captions, embed, index

        request.getfixturevalue("ray_session")
        root = folder / "data"
        shutil.copytree(request.getfixturevalue("ingested"), root)
        spec = model.resolve(None, "reference")
        embed.embed(root, spec, actors=1, batch_size=8)
        captions.embed_captions(root, spec, batch_size=8)
        return GoldStore(root, index.build(root))

    return built_once(run_dir, "gold", build)


@pytest.fixture(scope="session")
def gold_searcher(gold_store):
    """A Searcher open on the gold store (read-only: tests share it)."""
    from rayclip.query.searcher import Searcher

    return Searcher.open(gold_store.root)


@pytest.fixture
def live_gold(gold_store):
    """`rayclip serve`'s app on the gold store, on loopback (CORS open to a front's port)."""
    with serving_live(gold_store.root) as live:
        yield live


@pytest.fixture(scope="module")
def vectors_root(tmp_path_factory):
    """A published build of made-up vectors filed under the reference model (no Ray, no images):
    text queries encode with the reference model as on a real store."""
    from helpers.silver import clustered, media_ids, write_silver

    from rayclip.stages import index

    root = tmp_path_factory.mktemp("vectors") / "data"
    write_silver(root, "2026-01-01", media_ids(40), clustered(40))
    index.build(root)
    return root
