"""Ingest from shards already downloaded: img2dataset's own output and WebDataset tars, with no network.

The tars and folders here are made by real img2dataset against the loopback site; the loopback
server's request counter proves the ingest fetched nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.shards import webdataset_tar

from rayclip.stages import ingest
from rayclip.store import catalog
from rayclip.store.shards.read import expand_braces

GOOD = 6  # good images of the site in the img2dataset run, besides three that fail


@dataclass(frozen=True)
class Img2datasetOutput:
    folder: Path  # img2dataset's output folder: 00000.tar .. 00002.tar with their Parquet and stats
    expected: dict[str, tuple[str, str]]  # media_id (sha256 of the bytes) -> (url, caption) of each good image


@pytest.fixture(scope="module")
def img2dataset_output(site, tmp_path_factory) -> Img2datasetOutput:
    """Real img2dataset (output_format="webdataset", originals kept) over 6 good and 3 bad URLs, 4 per shard."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' update check: no network
    from img2dataset import download

    base, folder = site.base, tmp_path_factory.mktemp("i2d")
    names = site.images.column("filename").to_pylist()[:GOOD] + ["truncated.jpg", "page.jpg", "missing.jpg"]
    captions = site.images.column("caption").to_pylist()[:GOOD] + ["cut", "html", "404"]
    urls = [f"{base}/{name}" for name in names]
    pq.write_table(pa.table({"URL": urls, "TEXT": captions}), folder / "meta.parquet")
    download(
        url_list=str(folder / "meta.parquet"),
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_folder=str(folder / "out"),
        output_format="webdataset",
        resize_mode="no",
        disable_all_reencoding=True,
        compute_hash="sha256",
        number_sample_per_shard=4,
        processes_count=1,
        thread_count=4,
        timeout=3,
        enable_wandb=False,
    )
    good = zip(names[:GOOD], urls, captions)
    expected = {hashlib.sha256((site.folder / n).read_bytes()).hexdigest(): (u, c) for n, u, c in good}
    return Img2datasetOutput(folder / "out", expected)


def _stored(root) -> dict[str, tuple[str, str]]:
    manifest = catalog.read_manifest(root, ["media_id", "url", "caption"]).to_pylist()
    return {row["media_id"]: (row["url"], row["caption"]) for row in manifest}


def test_img2dataset_webdataset_output_ingests_without_a_download(site, img2dataset_output, tmp_path):
    out, expected = img2dataset_output.folder, img2dataset_output.expected
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    before = sum(site.requests.values())

    whole = ingest.ingest_img2dataset_output(tmp_path / "a", out)
    assert _stored(tmp_path / "a") == expected  # original bytes (content-addressed), url and caption
    assert whole.admitted == whole.stored == GOOD
    # The 404 from img2dataset's per-shard Parquet, by the reason a download here gives it; the page and
    # the cut JPEG it wrote as they came (disable_all_reencoding skips its decode): our decode check refuses them.
    assert whole.failed == {"decode error": 2, "HTTP 404": 1}

    tars = ingest.ingest_webdataset(tmp_path / "b", f"{out}/{{00000..00002}}.tar")
    assert _stored(tmp_path / "b") == expected
    assert (tars.admitted, tars.failed) == (GOOD, {"decode error": 2})  # the tars alone know of no 404
    assert sum(site.requests.values()) == before  # nothing fetched


def test_a_truncated_tar_and_members_that_are_not_images_are_counted_by_reason(site, tmp_path):
    images = [(site.folder / n).read_bytes() for n in site.images.column("filename").to_pylist()[:4]]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(
        webdataset_tar(
            [
                ("000000000", {"jpg": images[0], "txt": b"first", "json": json.dumps({"url": "https://a/0"}).encode()}),
                ("000000001", {"jpg": b"<html>not an image</html>", "txt": b"html"}),
                ("000000002", {"cls": b"3", "txt": b"no image at all"}),
            ]
        )
    )
    whole = webdataset_tar([(f"00000001{i}", {"jpg": images[1 + i], "txt": f"kept {i}".encode()}) for i in range(3)])
    cut_in_the_last_image = whole.index(images[3]) + len(images[3]) // 2
    (shards / "00001.tar").write_bytes(whole[:cut_in_the_last_image])
    assert expand_braces("s/{00000..00001}.tar") == ["s/00000.tar", "s/00001.tar"]

    report = ingest.ingest_webdataset(tmp_path / "data", f"{shards}/{{00000..00001}}.tar")
    assert report.failed == {"decode error": 1, "no image member": 1, "truncated tar": 1}
    assert report.admitted == 3  # the first tar's image and the two before the cut
    captions = {caption for _, caption in _stored(tmp_path / "data").values()}
    assert captions == {"first", "kept 0", "kept 1"}
