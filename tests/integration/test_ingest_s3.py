"""Ingest on an object-store data root (moto's S3 on loopback): the same bronze layer as a local run,
no local disk used (the kill points on both stores: test_kill_points.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.bronze import check_objects, downloads, objects
from helpers.site import GOOD_IMAGES
from helpers.stores import run_ingest

from rayclip.store import catalog, storage


@dataclass(frozen=True)
class LocalDirs:
    scratch: Path  # what TMPDIR names
    cwd: Path  # the working directory


@pytest.fixture
def empty_local_dirs(tmp_path, monkeypatch) -> LocalDirs:
    """TMPDIR and the working directory pointed at empty folders, to prove nothing lands on local disk."""
    import img2dataset  # noqa: F401 - first: this process's own wandb folders (made at import, gone at exit)

    dirs = LocalDirs(tmp_path / "tmpdir", tmp_path / "cwd")
    dirs.scratch.mkdir()
    dirs.cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(dirs.scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(dirs.cwd)
    return dirs


def assert_no_local_files(dirs: LocalDirs) -> None:
    """Nothing under TMPDIR or the working directory: not a file, and not the empty folders that
    wandb (imported by img2dataset's spawned processes) makes and, in those, never removes."""
    assert list(dirs.scratch.rglob("*")) == []
    assert list(dirs.cwd.iterdir()) == []


def test_same_bytes_from_many_urls_make_one_object(s3_root, site, tmp_path):
    """Checked side by side on the thread pool, the copies still make one object and one stored count."""
    first = site.images.column("filename")[0].as_py()
    urls = [f"{site.base}/{first}?copy={i}" for i in range(16)]  # the site ignores the query
    meta = tmp_path / "copies.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"copy {i}" for i in range(16)]}), meta)
    report = run_ingest(s3_root, meta)
    assert (report.admitted, report.stored, report.duplicates) == (16, 1, 15)
    assert len(objects(s3_root)) == 1 and catalog.read_manifest(s3_root).num_rows == 16


def uploaded(local_file, to: str) -> str:
    """`local_file` put on the S3 server as a user would (boto3, not rayclip); its s3:// URL."""
    import boto3

    bucket, key = to.removeprefix("s3://").split("/", 1)
    boto3.client("s3").upload_file(str(local_file), bucket, key)
    return to


def test_rerun_of_known_urls_on_s3_makes_no_request(s3_root, good_metadata, site, empty_local_dirs):
    """The metadata is read from an s3:// URL too (`--metadata s3://…`); the download's processes
    leave nothing on the local disk."""
    metadata_url = uploaded(good_metadata, f"{storage.uri(s3_root)}-inbox/laion/good.parquet")
    first = run_ingest(s3_root, metadata_url)
    assert (first.rows_read, first.stored, first.source) == (GOOD_IMAGES + 1, GOOD_IMAGES, "metadata:good.parquet")
    before = site.requests.copy()
    rerun = run_ingest(s3_root, metadata_url)
    assert (rerun.skipped_known_urls, rerun.admitted, rerun.stored, rerun.manifest_rows_added) == (
        GOOD_IMAGES + 1,
        0,
        0,
        0,
    )
    assert site.requests == before  # img2dataset was not even started
    assert_no_local_files(empty_local_dirs)


def test_folder_ingest_on_s3(s3_root, tmp_path, empty_local_dirs):
    """A folder on S3 (`--folder s3://…`, recursive, with a sidecar caption) into an S3 data root."""
    from rayclip import synthetic
    from rayclip.stages import ingest

    local = tmp_path / "photos"
    names = synthetic.write_images(local, 4, seed=5).column("filename").to_pylist()
    (local / names[0]).with_suffix(".txt").write_text("a sidecar caption\n")
    (local / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    folder = f"{storage.uri(s3_root)}-inbox/photos"
    for file in local.iterdir():  # the last image one level down: the listing is recursive
        uploaded(file, f"{folder}/{'nested/' * (file.name == names[-1])}{file.name}")

    report = ingest.ingest_folder(storage.uri(s3_root), folder)
    assert (report.rows_read, report.stored, report.failed) == (5, 4, {"decode error": 1})
    rows = {r["url"].rsplit("/", 1)[1]: r for r in catalog.read_manifest(s3_root).to_pylist()}
    assert rows[names[0]]["caption"] == "a sidecar caption" and rows[names[1]]["caption"] == ""
    assert rows[names[-1]]["url"] == f"{folder}/nested/{names[-1]}"  # where the bytes came from
    check_objects(s3_root)
    assert (ingest.ingest_folder(s3_root, folder).stored, len(objects(s3_root))) == (0, 4)
    assert_no_local_files(empty_local_dirs)


def test_distributor_ray_downloads_through_ray_tasks(ray_session, s3_root, good_metadata, monkeypatch):
    import importlib

    img2dataset_main = importlib.import_module("img2dataset.main")  # the package's `main` is a function

    def no_multiprocessing(*args, **kwargs):
        raise AssertionError("the multiprocessing distributor ran")

    monkeypatch.setattr(img2dataset_main, "multiprocessing_distributor", no_multiprocessing)
    report = run_ingest(s3_root, good_metadata, distributor="ray")
    assert (report.admitted, report.stored, report.duplicates, report.failed_total) == (
        GOOD_IMAGES + 1,
        GOOD_IMAGES,
        1,
        0,
    )
    assert catalog.read_manifest(s3_root).num_rows == GOOD_IMAGES + 1
    assert len(objects(s3_root)) == GOOD_IMAGES
    check_objects(s3_root)
    assert downloads(s3_root) == []
