"""Shared fixtures: a loopback image site, LAION-style metadata pointing at it, one Ray per session."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import logging
import os
import pickle
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclip import synthetic
from rayclip.cli import main
from rayclip.stages import ingest

GOOD_IMAGES = 24
SLOW_SECONDS = 8
S3_BUCKET = "rayclip-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The object-store tests talk to moto's S3 on loopback, found through the standard AWS variables.
# They are set when the test session starts, so every process it starts later (Ray's workers, CLI
# subprocesses) finds the same endpoint, as a real deployment's processes find theirs.
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
# Nothing leaves loopback: Ray's usage reporting and albumentations' update check (img2dataset
# imports it) stay off in this process and every process the tests start, whatever starts them.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1")


# `make test` runs the files on two xdist workers, one file at a time per worker, in this order: the
# longest first (seconds per file in a 2-core run's --durations), then the rest as collected, so that
# the short ones fill in at the end and both workers finish together. xdist's own order (the most
# tests first, `--no-loadscope-reorder` turns it off) left the longest file, one test, for last.
LONGEST_FIRST = (
    "test_object_store.py",
    "test_kill_points.py",
    "test_faults.py",
    "test_embed_s3.py",
    "test_pipeline.py",
    "test_ops.py",
    "test_distributed_index.py",
    "test_embed.py",
    "test_gold_s3.py",
    "test_eval.py",
    "test_precision.py",
    "test_embed_startup.py",
    "test_serve_ray.py",
    "test_images.py",
    "test_eval_formats.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def huge_png_header(side: int = 60_000) -> bytes:
    """A valid PNG start that claims side x side pixels: decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


class _SlowHandler(synthetic._QuietHandler):
    requests: Counter = Counter()  # GETs per path, for the tests that assert what was (not) fetched

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests[self.path] += 1
        if self.path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_SlowHandler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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
        yield {"folder": folder, "base": base, "images": images, "requests": _SlowHandler.requests}


@pytest.fixture(scope="session")
def metadata(site, tmp_path_factory):
    """LAION-format parquet: URL, TEXT, with good, duplicate and every kind of bad row."""
    base = site["base"]
    names = site["images"].column("filename").to_pylist()
    captions = site["images"].column("caption").to_pylist()
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
    names = site["images"].column("filename").to_pylist()
    urls = [f"{site['base']}/{n}" for n in names] + [f"{site['base']}/dup.jpg"]
    path = tmp_path_factory.mktemp("good") / "good.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]}), path)
    return path


def run_ingest(data_dir: Path, metadata_path: Path, **kwargs) -> ingest.IngestReport:
    return ingest.ingest_metadata(data_dir, metadata_path, timeout=3, **kwargs)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from rayclip.cluster import LOOPBACK, keep_loopback

    # address="local": a cluster of its own, even when `ray start` (or `rayclip up`) left one running here.
    # Its node on loopback, as cluster.start's: nothing listens beyond it.
    keep_loopback()
    ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=2, include_dashboard=False, log_to_driver=False)
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
    """moto's S3 API behind a throttling proxy (tests/s3_proxy.py) on the loopback port
    AWS_ENDPOINT_URL names, with one bucket. The proxy forwards everything untouched until a test
    asks it to spoil a share of the requests (the `s3_proxy` fixture)."""
    import boto3
    from moto.server import ThreadedMotoServer
    from s3_proxy import ThrottlingProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = ThrottlingProxy(port, server.get_host_and_port()).start()
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


def read_silver(root: Path, model_version: str) -> pa.Table:
    """Every committed silver row of a model_version, read back from Parquet (local or object store)."""
    from rayclip.store import catalog, storage

    tables = []
    for f in catalog.silver_files(root, model_version):
        with storage.open_input(f) as opened:
            tables.append(pq.read_table(opened))
    return pa.concat_tables(tables)


def open_clip_embeddings(root: Path, media_ids: list[str]):
    """What open_clip itself says for these objects' bytes (the reference model), without any
    rayclip code in the way but the manifest's paths."""
    import open_clip
    import torch
    from PIL import Image

    from rayclip import model
    from rayclip.store import catalog

    open_clip.add_model_config(model.CONFIG_DIR)
    net, _, preprocess = open_clip.create_model_and_transforms(
        model.REFERENCE_MODEL, pretrained=str(model.REFERENCE_WEIGHTS)
    )
    paths = dict(zip(*catalog.read_manifest(root, ["media_id", "path"]).to_pydict().values()))
    pixels = torch.stack([preprocess(Image.open(root / paths[m]).convert("RGB")) for m in media_ids])
    with torch.no_grad():
        features = net.eval().encode_image(pixels)
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def assert_rows_are_open_clips(root: Path, silver: pa.Table) -> None:
    """Each silver row's vector is open_clip's own for that row's media_id, and no other row's."""
    import numpy as np

    from rayclip.store import catalog

    ids = silver.column("media_id").to_pylist()
    cosine = catalog.vector_matrix(silver) @ open_clip_embeddings(root, ids).T
    assert np.all(np.diag(cosine) > 0.9999)
    # and the check can tell rows apart: no row matches another media_id that well
    assert cosine[~np.eye(len(ids), dtype=bool)].max() < 0.9999


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, worker_id) -> Path:
    """A folder every xdist worker of this run shares (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


BUILD_WAIT_S = 240  # for another worker's build of a shared store: below the test's own timeout


def _locked(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def built_once(run_dir: Path, name: str, build: Callable[[Path], object]) -> object:
    """build(folder) by the first worker of the run that asks; its result, pickled, for every worker
    (the others wait on the lock until it is there)."""
    result = run_dir / f"{name}.pickle"
    with open(run_dir / f"{name}.lock", "w") as lock:
        deadline = time.monotonic() + BUILD_WAIT_S
        while not _locked(lock):
            assert time.monotonic() < deadline, f"{name}: another worker held the build for {BUILD_WAIT_S} s"
            time.sleep(0.5)
        if not result.exists():  # a folder of its own each try: a failed build leaves its debris aside
            result.write_bytes(pickle.dumps(build(Path(tempfile.mkdtemp(prefix=name, dir=run_dir)))))
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def gold_store(request, run_dir):
    """ingest → embed images and captions (reference model, real Ray) → index, with its caption
    index: (data root, BuildReport). Read-only; built once per run, whatever the workers."""

    def build(folder: Path) -> tuple[Path, object]:
        from rayclip import model
        from rayclip.stages import captions, embed, index

        request.getfixturevalue("ray_session")
        root = folder / "data"
        shutil.copytree(request.getfixturevalue("ingested"), root)
        spec = model.resolve(None, "reference")
        embed.embed(root, spec, actors=1, batch_size=8)
        captions.embed_captions(root, spec, batch_size=8)
        return root, index.build(root)

    return built_once(run_dir, "gold", build)


@contextlib.contextmanager
def held_out_site(folder: Path, count: int, seed: int):
    """`count` captioned JPEGs (a seed training never used) served on loopback: (LAION metadata, data root)."""
    images = synthetic.write_images(folder / "site", count, seed=seed)
    with synthetic.serve_folder(folder / "site") as base:
        yield synthetic.write_metadata(images, base, folder / "meta.parquet"), folder / "data"


@pytest.fixture(scope="module")
def vectors_root(tmp_path_factory):
    """A published build of made-up vectors filed under the reference model (no Ray, no images):
    text queries encode with the reference model as on a real store."""
    from silver_helpers import clustered, media_ids, write_silver

    from rayclip.stages import index

    root = tmp_path_factory.mktemp("vectors") / "data"
    write_silver(root, "2026-01-01", media_ids(40), clustered(40))
    index.build(root)
    return root
