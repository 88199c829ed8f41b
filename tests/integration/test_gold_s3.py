"""Gold on an object store (moto's S3 on loopback): index, search, the Searcher's cache, serve, status
and gc on `s3://…` behave as on a local folder, and a build killed on S3 is never read."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.kills import assert_killed, rayclip
from helpers.silver import FILLED_DAY, clustered, fill, reference_spec
from helpers.stores import cli

from rayclip import Searcher
from rayclip.http.app import create_app
from rayclip.stages import index
from rayclip.store import catalog, debris, layout, storage
from rayclip.store.catalog import BuildInfo
from rayclip.store.storage import files, leases

ROWS = 400


def hits(results) -> list[list[tuple[str, float]]]:
    return [[(r.media_id, r.score) for r in result] for result in results]


def remote_reads(monkeypatch) -> list[str]:
    """Names of the objects read from a store (not from local files) from now on: every read opens
    its object through storage.open_input (storage.read_bytes too)."""
    reads: list[str] = []
    real = files.open_input

    def counted(loc, *args, **kwargs):
        if not storage.is_local(loc):
            reads.append(loc.name)
        return real(loc, *args, **kwargs)

    for module in (storage, files):  # callers through storage, and storage's own reads and copies
        monkeypatch.setattr(module, "open_input", counted)
    return reads


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rayclip"


@pytest.fixture
def mv() -> str:
    return reference_spec().model_version


def test_index_and_search_on_s3_equal_the_same_silver_locally_and_touch_no_local_disk(
    s3_root, tmp_path, cache, mv, monkeypatch
):
    local = storage.data_root(tmp_path / "local")
    for root in (local, s3_root):
        fill(root, ROWS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    queries = clustered(8, seed=7)

    on_disk, on_s3 = index.build(local), index.build(s3_root)
    assert on_disk.count == on_s3.count == ROWS and on_s3.path.startswith("s3://")
    assert catalog.builds(s3_root, mv) == [on_s3.build_id] == [catalog.current_build(s3_root, mv)]
    assert hits(Searcher.open(local).search_vectors(queries, 10)) == hits(
        Searcher.open(s3_root).search_vectors(queries, 10)
    )

    # An incremental build on S3 reads its base build (index, mapping, tuning) back from the store.
    for root in (local, s3_root):
        fill(root, 50, prefix="new")
    again_disk, again_s3 = index.build(local), index.build(s3_root)
    assert again_s3.base_build == on_s3.build_id and again_disk.base_build == on_disk.build_id
    assert again_s3.count == again_disk.count == ROWS + 50
    local_searcher, s3_searcher = Searcher.open(local), Searcher.open(s3_root)
    assert s3_searcher.build_info.build_id == again_s3.build_id
    assert hits(local_searcher.search_vectors(queries, 10)) == hits(s3_searcher.search_vectors(queries, 10))
    assert hits(local_searcher.search_texts(["a dog", "a red circle"], 5)) == hits(
        s3_searcher.search_texts(["a dog", "a red circle"], 5)
    )
    assert local_searcher.mapping.table.column("media_id").equals(s3_searcher.mapping.table.column("media_id"))

    # Of this machine's disk, S3 work used the Searcher's cache and nothing else.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "local", "tmp"]
    assert not any((tmp_path / "tmp").iterdir())
    cached = layout.build_cache(cache, s3_root, mv, again_s3.build_id)
    assert sorted(p.name for p in cached.iterdir()) == ["build.json", "index.faiss", "mapping.parquet"]


def test_a_second_open_on_the_same_build_reads_only_current_from_the_store(s3_root, cache, mv, monkeypatch):
    fill(s3_root, ROWS)
    built = index.build(s3_root)
    reads = remote_reads(monkeypatch)

    first = Searcher.open(s3_root)
    assert {"CURRENT", "build.json", "index.faiss", "mapping.parquet"} <= set(reads)
    reads.clear()
    second = Searcher.open(s3_root)  # a restart on the same build
    assert reads == ["CURRENT"]
    assert second.build_info == first.build_info and second.build_info.build_id == built.build_id
    queries = clustered(4, seed=3)
    assert hits(second.search_vectors(queries, 5)) == hits(first.search_vectors(queries, 5))


@pytest.mark.parametrize("point", ["index.build", "index.publish"])
def test_index_killed_on_s3_leaves_current_on_the_old_build(s3_root, cache, mv, monkeypatch, capsys, point):
    fill(s3_root, ROWS)
    published = index.build(s3_root).build_id
    fill(s3_root, 50, prefix="new")
    assert_killed(*rayclip("index", "--data-dir", storage.uri(s3_root), kill_at=point, timeout=120))

    assert catalog.current_build(s3_root, mv) == published
    searcher = Searcher.open(s3_root)
    assert searcher.build_info.build_id == published and searcher.build_info.count == ROWS
    folders = [f.name for f in storage.children(layout.builds_dir(s3_root, mv))]
    assert len(folders) == 2  # the killed build wrote into its own folder
    if point == "index.build":  # no build.json: not a build, and debris once its lease is stale
        assert catalog.builds(s3_root, mv) == [published]
        assert debris.find(s3_root) == []  # its lease is fresh: it may be a live build on another machine
        monkeypatch.setattr(leases, "LEASE_STALE_S", 0.0)
        killed = next(name for name in folders if name != published)
        found = [storage.uri(p) for p in debris.find(s3_root)]
        assert found == [storage.uri(layout.build_dir(s3_root, mv, killed))]
    else:  # committed (build.json) but never named by CURRENT: listed for rollback, not debris
        assert len(catalog.builds(s3_root, mv)) == 2 and debris.find(s3_root) == []

    rerun = index.build(s3_root)  # sweeps the dead folder first
    assert catalog.current_build(s3_root, mv) == rerun.build_id and rerun.count == ROWS + 50
    assert Searcher.open(s3_root).build_info.build_id == rerun.build_id
    assert debris.find(s3_root) == []


def test_gc_on_s3_sweeps_a_dead_build_folder_and_keeps_the_builds(s3_root, cache, mv, capsys):
    fill(s3_root, ROWS)
    published = index.build(s3_root).build_id
    dead = layout.build_dir(s3_root, mv, layout.new_run_id())
    storage.write_atomic(layout.index_file(dead), b"half an index")  # no build.json, no lease: a dead build

    capsys.readouterr()
    assert cli("gc", "--data-dir", storage.uri(s3_root)) == 0
    assert f"removed gold/{mv}/builds/{dead.name}\n" in capsys.readouterr().out
    assert not storage.exists(layout.index_file(dead))
    assert cli("gc", "--data-dir", storage.uri(s3_root), "--json") == 0
    assert json.loads(capsys.readouterr().out)["removed"] == []
    assert catalog.builds(s3_root, mv) == [published] and Searcher.open(s3_root).build_info.build_id == published


def test_index_search_and_status_commands_on_s3(s3_root, cache, mv, capsys):
    fill(s3_root, ROWS)
    uri = storage.uri(s3_root)
    assert cli("index", "--data-dir", uri) == 0
    assert "published build" in capsys.readouterr().out
    assert cli("search", "--data-dir", uri, "--q", "a dog", "--k", "3", "--json") == 0
    found = json.loads(capsys.readouterr().out)
    assert [r["media_id"] for r in found] == [r.media_id for r in Searcher.open(uri).search_text("a dog", 3)]

    assert cli("status", "--data-dir", uri) == 0
    assert "gold builds" in capsys.readouterr().out  # the table (a narrow capture truncates its cells)
    assert cli("status", "--data-dir", uri, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    [built] = catalog.builds(s3_root, mv)
    assert info["data_dir"] == uri
    assert info["bronze"]["manifest_rows"] == ROWS
    assert info["silver"] == [{"model_version": mv, "dt": FILLED_DAY, "files": 1, "rows": ROWS}]
    [gold] = info["gold"]
    assert gold["build_id"] == built and gold["current"] and gold["count"] == ROWS
    assert gold["index_bytes"] == storage.size(layout.index_file(layout.build_dir(s3_root, mv, built)))
    assert gold["index_type"] == "flat" and gold["recall_at_10"] == 1.0  # what the build measured: exact
    assert info["debris"] == []


def noise_png(side: int = 700) -> bytes:
    """A PNG larger than one streamed chunk (random pixels do not compress)."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_serve_on_s3_searches_streams_images_and_follows_current(s3_root, cache, mv):
    fill(s3_root, ROWS)
    first = index.build(s3_root)
    picture = noise_png()
    assert len(picture) > storage.CHUNK_BYTES
    media_id = hashlib.sha256(picture).hexdigest()
    storage.put_if_absent(s3_root / layout.object_relpath(media_id, "png"), picture)

    client = TestClient(create_app(storage.uri(s3_root)))
    found = client.get("/api/search", params={"q": "a dog", "k": 5})
    assert found.status_code == 200
    body = found.json()
    assert body["build_id"] == first.build_id and len(body["results"]) == 5
    expected = Searcher.open(s3_root).search_text("a dog", 5)
    assert [r["media_id"] for r in body["results"]] == [r.media_id for r in expected]

    image = client.get(f"/api/images/{media_id}")
    assert image.status_code == 200 and image.content == picture
    assert image.headers["content-type"] == "image/png" and image.headers["content-length"] == str(len(picture))
    assert client.get("/api/images/" + "0" * 64).status_code == 404

    fill(s3_root, 50, prefix="new")
    second = index.build(s3_root)
    status = client.get("/api/status").json()
    assert status["build_id"] == second.build_id and status["count"] == ROWS + 50


def test_build_info_reads_the_first_builds_shape_and_keeps_keys_it_does_not_know(s3_root, mv):
    first_shape = {  # what the first rayclip builds wrote, plus a key from a later version
        "build_id": "20260101T000000.000000Z-abcdef",
        "model_version": mv,
        "model": reference_spec().to_dict(),
        "dim": 128,
        "metric": "inner_product (cosine on L2-normalised vectors)",
        "index_type": "flat",
        "count": 3,
        "duplicates_dropped": 0,
        "created_at": "2026-01-01T00:00:00+00:00",
        "source_partitions": [f"dt={FILLED_DAY}"],
        "source_files": 1,
        "timings": {"build_s": 0.1, "total_s": 0.2},
        "from_a_later_version": {"x": 1},
    }
    old = s3_root / "old.json"
    storage.write_json_atomic(old, first_shape)
    info = BuildInfo.read(old)
    assert info.silver_files is None and info.search_params == {} and info.recall == {}
    assert info.extra == {"from_a_later_version": {"x": 1}}
    info.write(s3_root / "again.json")
    assert storage.read_json(s3_root / "again.json").items() >= first_shape.items()

    fill(s3_root, ROWS)
    built = index.build(s3_root)
    written = storage.read_json(layout.build_info_file(layout.build_dir(s3_root, mv, built.build_id)))
    assert catalog.build_info(s3_root, mv, built.build_id).to_dict() == written and "extra" not in written


@pytest.mark.parametrize(
    "options, form, index_files",
    [
        ({"on_disk": True}, "ondisk", ["index.ivfdata", "trained.faiss"]),
        ({"shards": 2}, "shards", ["shard-00000.faiss", "shard-00001.faiss", "trained.faiss"]),
    ],
)
def test_a_build_in_parts_on_s3_equals_it_locally(s3_root, tmp_path, mv, options, form, index_files):
    """Parts, the on-disk merge (which FAISS does on local files: a scratch folder, then uploaded) and
    shards on S3 give the bytes of the same build on a local folder; index.ivfdata lies beside index.faiss."""
    local = storage.data_root(tmp_path / "local")
    for root in (local, s3_root):
        fill(root, rows=1200)
    asked = {"index_type": "IVF8,SQ8", "part_vectors": 500, "parallel": "local"} | options
    builds = [index.build(root, **asked) for root in (local, s3_root)]
    infos = [catalog.build_info(root, mv, built.build_id) for root, built in zip((local, s3_root), builds)]
    assert infos[0].file_bytes == infos[1].file_bytes and infos[1].steps["parts"] == 3
    assert infos[0].shards == infos[1].shards and infos[1].form == form
    # The index files byte for byte (index.faiss of the on-disk form names where its lists were merged;
    # mapping.parquet carries each silver row's embedded_at, a time).
    compared = [n for n in infos[1].file_bytes if n.endswith((".ivfdata", ".faiss")) and n != "index.faiss"]
    assert compared == index_files
    for name in compared:
        here = layout.build_dir(local, mv, builds[0].build_id) / name
        there = layout.build_dir(s3_root, mv, builds[1].build_id) / name
        assert storage.read_bytes(here) == storage.read_bytes(there), name
    assert not storage.exists(layout.build_dir(s3_root, mv, builds[1].build_id) / "parts")
