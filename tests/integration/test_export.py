"""`rayclip export`: a subset out as img2dataset-shaped shards, and back in through the shard ingest."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers.s3_proxy import S3_BUCKET
from helpers.stores import cli

from rayclip import export
from rayclip.errors import UserError
from rayclip.query.terms import Term
from rayclip.stages import ingest
from rayclip.store import catalog, storage


def _pairs(root) -> set[tuple[str, str, str]]:
    """(media_id, url, caption) of every manifest row."""
    rows = catalog.read_manifest(root, ["media_id", "url", "caption"]).to_pylist()
    return {(r["media_id"], r["url"], r["caption"]) for r in rows}


def _tar_samples(tar_path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def export_gold(gold_store, tmp_path_factory) -> Path:
    """A private copy of the shared gold store: an export writes its run record into the data root."""
    root = tmp_path_factory.mktemp("export") / "data"
    shutil.copytree(gold_store.root, root)
    return root


def test_a_query_and_a_filter_export_as_webdataset_and_ingest_back_to_the_same_media_ids(export_gold, site, tmp_path):
    root = export_gold
    caption = site.images.column("caption")[3].as_py()
    report = export.export(root, tmp_path / "q", [Term("text", caption)], k=5, samples_per_shard=2)
    assert (report.selected, report.exported, report.shards, report.failed) == (5, 5, 3, {})
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        f"0000{i}.{ext}" for i in range(3) for ext in ("parquet", "tar")
    ]
    samples = _tar_samples(tmp_path / "q" / "00001.tar")
    assert sorted(samples) == ["000010", "000011"]  # img2dataset's keys: shard * 10^ceil(log10(2)) + i
    meta = json.loads(samples["000010"]["json"])
    image = samples["000010"]["jpg"]
    assert hashlib.sha256(image).hexdigest() == meta["media_id"]  # the stored original bytes
    manifest = catalog.read_manifest(root, ["media_id", "url"])
    [url] = manifest.filter(pc.equal(manifest.column("media_id"), meta["media_id"])).column("url").to_pylist()
    assert samples["000010"]["txt"].decode() == meta["caption"] and meta["url"] == url
    assert 0 < meta["score"] <= 1 and {"width", "height", "format"} <= set(meta)

    ingest.ingest_webdataset(tmp_path / "back", f"{tmp_path}/q/*.tar")
    exported = {
        json.loads(s["json"])["media_id"] for t in (tmp_path / "q").glob("*.tar") for s in _tar_samples(t).values()
    }
    assert {m for m, _, _ in _pairs(tmp_path / "back")} == exported and len(exported) == 5
    assert _pairs(tmp_path / "back") <= _pairs(root)  # same urls and captions

    # --where alone: the manifest rows it keeps (no query), the same bronze rows after the round trip
    kept = sorted(_pairs(root))[:3]
    where = "media_id IN (" + ", ".join(f"'{m}'" for m, _, _ in kept) + ")"
    filtered = export.export(root, tmp_path / "w", where=where)
    assert filtered.exported == filtered.selected >= 3
    ingest.ingest_webdataset(tmp_path / "back2", f"{tmp_path}/w/00000.tar")
    assert _pairs(tmp_path / "back2") == {p for p in _pairs(root) if p[0] in {m for m, _, _ in kept}}


def test_parquet_and_folder_formats_carry_the_bytes_and_read_back_as_img2dataset_output(export_gold, tmp_path):
    root = export_gold
    kept = sorted(_pairs(root))[:4]
    where = "media_id IN (" + ", ".join(f"'{m}'" for m, _, _ in kept) + ")"
    expected = {p for p in _pairs(root) if p[0] in {m for m, _, _ in kept}}
    for format in ("parquet", "folder"):
        export.export(root, tmp_path / format, format=format, where=where, samples_per_shard=3)
        table = pq.read_table(tmp_path / format / "00000.parquet")
        assert table.num_rows == 3 and table.column("key").to_pylist() == ["000000", "000001", "000002"]
        ingest.ingest_img2dataset_output(tmp_path / f"back-{format}", tmp_path / format)
        assert _pairs(tmp_path / f"back-{format}") == expected
    first = pq.read_table(tmp_path / "parquet" / "00000.parquet").to_pylist()[0]
    assert hashlib.sha256(first["jpg"]).hexdigest() == first["media_id"]
    assert (tmp_path / "folder" / "00000" / "000000.txt").read_text() == first["caption"]

    with pytest.raises(UserError, match="not empty"):  # never mixed with an earlier export's shards
        export.export(root, tmp_path / "folder", where=where)


def test_an_export_to_an_object_store_ingests_back_from_it(export_gold, s3_server, tmp_path):
    root = export_gold
    kept = sorted(_pairs(root))[:3]
    where = "media_id IN (" + ", ".join(f"'{m}'" for m, _, _ in kept) + ")"
    target = f"s3://{S3_BUCKET}/exports/{tmp_path.name}"
    report = export.export(root, target, where=where)
    assert report.exported >= 3 and storage.exists(storage.location(f"{target}/00000.tar"))
    ingest.ingest_webdataset(tmp_path / "back", f"{target}/*.tar")
    assert {m for m, _, _ in _pairs(tmp_path / "back")} == {m for m, _, _ in kept}


def test_cli_exports_20_query_results_and_ingests_them_into_a_fresh_root(export_gold, site, tmp_path, monkeypatch):
    root = export_gold
    caption = site.images.column("caption")[0].as_py()
    shards = tmp_path / "shards"

    def no_connection(sock, address):
        raise AssertionError(f"a connection to {address}: export and ingest --webdataset fetch nothing")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    export = ["export", "--data-dir", str(root), "--q", caption, "--k", "20", "--to", str(shards)]
    assert cli(*export, "--samples-per-shard", "8") == 0
    tars = sorted(shards.glob("*.tar"))
    exported = {json.loads(s["json"])["media_id"] for tar in tars for s in _tar_samples(tar).values()}
    assert len(tars) == 3 and len(exported) == 20
    # The tars as a shell hands over an unquoted DIR/*.tar: one argument each.
    assert cli("ingest", "--data-dir", str(tmp_path / "fresh"), "--webdataset", *map(str, tars)) == 0
    assert {m for m, _, _ in _pairs(tmp_path / "fresh")} == exported
