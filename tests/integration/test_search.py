"""Gold builds and search end to end: ingest → embed (real Ray) → index (real FAISS) → search."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import bounded
from helpers.site import GOOD_IMAGES
from helpers.stores import GoldStore, cli, read_silver

from rayclip import Searcher, UserError
from rayclip.stages import index
from rayclip.store import catalog, layout

PUBLISHES = 30


@pytest.fixture(scope="module")
def built(gold_store, tmp_path_factory) -> GoldStore:
    """A private copy of the gold store: these tests publish and roll back builds."""
    root = tmp_path_factory.mktemp("gold-private") / "data"
    shutil.copytree(gold_store.root, root)
    return GoldStore(root, gold_store.build)


@pytest.fixture(scope="module")
def built_searcher(built):
    return Searcher.open(built.root)


def silver_vectors(root) -> tuple[list[str], np.ndarray]:
    table = read_silver(root, "clip_rayclip_ref_reference")
    return table.column("media_id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_build_is_published_with_its_contract(built):
    root, report = built.root, built.build
    folder = layout.build_dir(root, report.model_version, report.build_id)
    info = json.loads((folder / "build.json").read_text())
    mapping = pq.read_table(folder / "mapping.parquet")
    assert catalog.current_build(root, report.model_version) == report.build_id
    # Same bytes ingested from two URLs: one vector (the manifest holds GOOD_IMAGES + 1 rows).
    assert catalog.read_manifest(root).num_rows == GOOD_IMAGES + 1
    assert info["count"] == mapping.num_rows == GOOD_IMAGES
    assert mapping.column("faiss_id").to_pylist() == list(range(GOOD_IMAGES))
    assert set(mapping.column_names) >= {"faiss_id", "media_id", "path", "url", "caption", "source_count"}
    assert sorted(mapping.column("source_count").to_pylist())[-1] == 2
    assert info["model"]["name"] == "RayCLIP-Ref" and len(info["model"]["checkpoint_sha256"]) == 64
    assert info["dim"] == 128 and info["index_type"] == "flat" and info["source_partitions"]


def test_image_query_finds_itself_first(built, built_searcher):
    root = built.root
    for row in catalog.read_manifest(root).to_pylist()[:3]:
        results = built_searcher.search_image(root / row["path"], k=3)
        assert results[0].media_id == row["media_id"]
        assert results[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("query", ["a large red circle on the left on a white background", "a small blue star"])
def test_text_search_matches_brute_force_over_silver(built, built_searcher, query):
    ids, vectors = silver_vectors(built.root)
    scores = vectors @ built_searcher.model.encode_texts([query])[0]
    expected = [ids[i] for i in np.argsort(-scores)[:5]]
    results = built_searcher.search_text(query, k=5)
    assert [r.media_id for r in results] == expected
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    got = [r.score for r in results]
    assert got == sorted(got, reverse=True)
    assert got == pytest.approx(sorted(scores, reverse=True)[:5], abs=1e-5)


def test_rebuild_from_same_silver_gives_same_mapping(built):
    root, first = built.root, built.build
    second = index.build(root, retrain=True)  # a full build again, not an extension of the first

    def read(b):
        return pq.read_table(layout.build_dir(root, b.model_version, b.build_id) / "mapping.parquet")

    assert read(first).select(["faiss_id", "media_id"]).equals(read(second).select(["faiss_id", "media_id"]))
    old, new = index.rollback(root)
    assert (old, new) == (second.build_id, first.build_id)
    # Read back: CURRENT names the earlier build, and a new reader serves it.
    assert layout.current_file(root, first.model_version).read_text().strip() == first.build_id
    assert Searcher.open(root).build_info.build_id == first.build_id


READER = """
import json, os, sys, time
from pathlib import Path
from rayclip import Searcher
root, expected, stop = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
built_searcher, seen, checks = Searcher.open(root), set(), 0
print("ready", flush=True)
deadline = time.monotonic() + 240
while not stop.exists() and time.monotonic() < deadline:
    changed = built_searcher.refresh()  # what the HTTP service does per request: read CURRENT, load the build it names
    mapping, index = built_searcher.mapping.table, built_searcher._build.knn.index
    assert built_searcher.build_info.count == mapping.num_rows == index.ntotal == expected, built_searcher.build_info
    seen.add(built_searcher.build_info.build_id)
    if changed:
        print("seen", built_searcher.build_info.build_id, flush=True)
    checks += 1
print(json.dumps({"builds_seen": len(seen), "checks": checks}), flush=True)
# Ends as a rayclip command ends (cli._exit): no teardown of every module. A library's thread torn
# down at interpreter exit once aborted this reader (SIGABRT: "terminate called without an active
# exception") after its checks were done.
os._exit(0)
"""


def test_readers_never_see_a_partial_build(built, tmp_path):
    """A reader process polls CURRENT as fast as it can while this one publishes build after build;
    any half-written build it ever loads fails it. It must see the builds change under it: each is
    published once the reader has loaded the one before (under load a load outlasts a 24-vector
    build, and a reader not waited for saw 11 of 30)."""
    import subprocess
    import sys

    root, stop = built.root, tmp_path / "stop"
    cmd = [sys.executable, "-c", READER, str(root), str(GOOD_IMAGES), str(stop)]
    reader = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert bounded.readline_within(reader.stdout, 120).strip() == "ready"  # its model is loaded; it polls now
        for _ in range(PUBLISHES):
            if reader.poll() is not None:
                break
            published = index.build(root).build_id
            assert bounded.readline_within(reader.stdout, 120).split() == ["seen", published]
    finally:
        stop.touch()
        try:
            out, err = reader.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            bounded.kill_tree(reader)
            raise
    assert reader.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert result["builds_seen"] == PUBLISHES + 1 and result["checks"] > PUBLISHES, result  # each, and the first


def test_query_adjustments_are_noted(built_searcher):
    clamped = built_searcher.search_text("a green cross", k=10_000)
    assert len(clamped) == GOOD_IMAGES and "clamped" in clamped.notes[0]
    assert len(built_searcher.search_text("a green cross", k=0)) == 1
    long = built_searcher.search_text("a green cross " * 40, k=2)
    assert any("truncated" in n for n in long.notes)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, tmp: s.search_text("   "), "the query is empty"),
        (lambda s, tmp: s.search_image(tmp / "nope.jpg"), "cannot read the query image"),
        (lambda s, tmp: s.search_image(b"not an image"), "cannot read the query image"),
        (lambda s, tmp: Searcher.open(tmp / "empty"), "no index yet"),
    ],
)
def test_bad_queries_raise_user_errors(built_searcher, tmp_path, call, message):
    with pytest.raises(UserError, match=message):
        call(built_searcher, tmp_path)


def test_broken_build_is_refused_by_name(built, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(built.root, root)
    mv = "clip_rayclip_ref_reference"
    build_id = catalog.current_build(root, mv)
    mapping_file = layout.build_dir(root, mv, build_id) / "mapping.parquet"
    pq.write_table(pq.read_table(mapping_file).slice(0, 5), mapping_file)
    assert cli("search", "--data-dir", str(root), "--q", "a red circle") != 0  # 1: a file not as committed
    err = capsys.readouterr().err
    assert f"build {build_id} of {mv} is broken" in err and len(err.strip().splitlines()) == 1


def test_cli_json_and_status(built, capsys):
    root = str(built.root)
    assert cli("search", "--data-dir", root, "--q", "a small yellow triangle", "--k", "5", "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert set(results[0]) == {"rank", "score", "media_id", "path", "url", "caption", "duplicates", "faiss_id"}
    assert cli("status", "--data-dir", root, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["bronze"]["unique_media_ids"] == GOOD_IMAGES
    assert sum(b["current"] for b in status["gold"]) == 1


@pytest.mark.parametrize("index_type", ["HNSW32", "IVF4,Flat"])  # IVF needs training first
def test_other_faiss_index_types(built, tmp_path, index_type):
    root = tmp_path / "data"
    shutil.copytree(built.root, root)
    report = index.build(root, index_type=index_type)
    info = json.loads((layout.build_dir(root, report.model_version, report.build_id) / "build.json").read_text())
    assert info["index_type"] == index_type and info["count"] == GOOD_IMAGES
    row = catalog.read_manifest(root).to_pylist()[0]
    assert Searcher.open(root).search_image(root / row["path"], k=1)[0].media_id == row["media_id"]
    with pytest.raises(UserError, match="unknown --index-type"):
        index.build(root, index_type="NoSuchIndex")


def test_mapping_rows_find_ids_in_any_chunk():
    """The join's row lookup slices the chunk each id falls in (a Parquet mapping has one chunk per
    row group); it must give what Table.take gives, across chunk boundaries and in the order asked."""
    import pyarrow as pa

    from rayclip.query.mapping import Mapping

    table = pa.table({"faiss_id": np.arange(10), "media_id": [f"m{i}" for i in range(10)]})
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=3))  # chunks 0-2, 3-5, 6-8, 9
    ids = [9, 0, 3, 2, 6, 5, 8, 3]
    assert chunked.column("media_id").num_chunks == 4
    assert (
        Mapping(chunked).rows(ids, ["media_id", "faiss_id"])
        == chunked.take(ids).to_pylist()
        == [{"media_id": f"m{i}", "faiss_id": i} for i in ids]
    )


def test_mapping_finds_faiss_ids_by_media_id():
    """The one media_id → faiss_id lookup: every id in any chunk, -1 for one the build lacks
    (a hex id not there, a prefix of a real one, something that is not hex at all)."""
    import hashlib

    import pyarrow as pa

    from rayclip.query.mapping import ABSENT, Mapping

    media_ids = [hashlib.sha256(bytes([i])).hexdigest() for i in range(50)]
    table = pa.Table.from_batches(pa.table({"faiss_id": np.arange(50), "media_id": media_ids}).to_batches(7))
    asked = [
        media_ids[49],
        media_ids[0],
        hashlib.sha256(b"other").hexdigest(),
        media_ids[3][:20],
        "not-hex",
        media_ids[8],
    ]
    assert Mapping(table).faiss_ids(asked).tolist() == [49, 0, ABSENT, ABSENT, ABSENT, 8]
