"""How serve holds a build's image index: in RAM, memory-mapped, or in shards (one process here;
behind Ray Serve in test_serve_ray.py). Every form answers every query route as the in-RAM build does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.index_forms import (
    WholeAndSharded,
    a_build,
    ondisk_copy,
    query_answers,
    scores_within_rounding,
    whole_and_sharded,
    without_build_ids,
)

from rayclip.http.app import create_app
from rayclip.query import knn
from rayclip.query.knn import LocalIndex, ShardedIndex


@pytest.fixture(scope="module", params=["IVF64,Flat", "IVF64,SQ8"])
def builds(request, tmp_path_factory) -> WholeAndSharded:
    """An IVF build (each index type of the params) and the same index kept in 2 shards."""
    return whole_and_sharded(tmp_path_factory.mktemp("forms"), index_type=request.param)


@pytest.fixture(scope="module")
def in_ram(builds):
    client = TestClient(create_app(builds.root))
    return scores_within_rounding(without_build_ids(query_answers(client, a_media_id(client))))


def maps_its_lists(client) -> bool:
    """Whether every FAISS index the served build is searched in reads its lists from a mapped file."""
    held = client.app.state.service.searcher().snapshot().knn
    indexes = [shard.index for shard in held.shards] if isinstance(held, ShardedIndex) else [held.index]
    lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(i).invlists) for i in indexes]
    return all(isinstance(found, faiss.OnDiskInvertedLists) for found in lists)


def a_media_id(client) -> str:
    return client.app.state.service.searcher().mapping.table.column("media_id")[7].as_py()


def test_the_answers_compared_are_not_empty(in_ram):
    assert all(answer["results"] for name, answer in in_ram.items() if name != "knn-service")
    assert len(in_ram["knn-service"]) == 20  # clip-retrieval's answer is a bare list
    assert any(r["duplicates"] for r in in_ram["collapse"]["results"])  # collapse folded something
    assert all(r["caption"].startswith("a dog") for r in in_ram["where"]["results"])


def test_a_sharded_build_answers_as_the_unsharded_one(builds, in_ram):
    client = TestClient(create_app(builds.sharded_root))
    answers = query_answers(client, a_media_id(client))
    held = client.app.state.service.searcher().snapshot().knn
    assert isinstance(held, ShardedIndex) and [s.ntotal for s in held.shards] == [2000, 2000]
    assert without_build_ids(answers) == in_ram


def test_a_mapped_build_answers_as_the_one_in_ram(builds, in_ram):
    client = TestClient(create_app(builds.root, mmap=True))
    assert without_build_ids(query_answers(client, a_media_id(client))) == in_ram
    assert maps_its_lists(client)
    status = client.get("/api/status").json()
    assert status["mapped_index_bytes"] == status["index_bytes"] > 0
    assert status["memory"]["resident_private_bytes"] > 0 and status["memory"]["resident_file_bytes"] > 0


def test_a_mapped_build_answers_caption_searches_as_the_one_in_ram(gold_store):
    """The caption index and its table are mapped with the image index (captions.faiss, captions.arrow)."""
    params = {"q": "a photo", "k": 20, "over": "captions", "where": "clip_score > 0"}
    answers = [TestClient(create_app(gold_store.root, mmap=m)).get("/api/search", params=params) for m in (False, True)]
    in_ram, mapped = (answer.json()["results"] for answer in answers)
    assert in_ram and all(r["caption_row"] is not None for r in in_ram)
    assert mapped == in_ram


def test_an_index_over_the_memory_budget_is_mapped_on_its_own(builds):
    client = TestClient(create_app(builds.root, max_index_memory="1K"))
    assert client.get("/api/status").json()["mapped_index_bytes"] > 0 and maps_its_lists(client)
    client = TestClient(create_app(builds.root))  # the default budget holds it: read into RAM
    assert client.get("/api/status").json()["mapped_index_bytes"] == 0 and not maps_its_lists(client)


def test_a_build_merged_on_disk_is_mapped_and_answers_as_the_one_in_ram(builds, in_ram):
    root, report = builds.root, builds.report
    # Merged in one folder and moved (as a build is renamed into place): index.faiss names a gone path.
    merged = ondisk_copy(root, root.parent / "merging", report.model_version, report.build_id)
    ondisk = merged.rename(root.parent / "ondisk")
    client = TestClient(create_app(ondisk))  # no --mmap: its lists are on disk whatever the budget
    assert without_build_ids(query_answers(client, a_media_id(client))) == in_ram
    assert maps_its_lists(client) and client.get("/api/status").json()["form"] == "ondisk"


def test_a_sharded_mapped_build_answers_as_the_unsharded_one(builds, in_ram):
    client = TestClient(create_app(builds.sharded_root, mmap=True))
    assert without_build_ids(query_answers(client, a_media_id(client))) == in_ram
    assert maps_its_lists(client)


# Measured in a fresh process: the index read (in RAM or mapped) and 200 queries searched, its
# private memory (RssAnon) before and after, from /proc/<pid>/status.
MEASURE = textwrap.dedent(
    """
    import json, pathlib, sys, types
    import numpy as np
    from rayclip.query import knn

    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    path, mapped = sys.argv[1], sys.argv[2] == "mmap"
    queries = np.random.default_rng(1).standard_normal((200, 128)).astype(np.float32)
    before = anon()
    info = types.SimpleNamespace(form="single", index_type="IVF256,Flat", search_params={"nprobe": 8})
    index = knn.read_local(pathlib.Path(path), info, mapped)
    scores, ids = knn.search(index, queries, 10, None)
    allowed = np.arange(0, index.ntotal, 3)
    knn.search(index, queries, 10, allowed)
    print(json.dumps({"grew": anon() - before, "ids": ids.tolist()}))
    """
)


def test_a_mapped_index_stays_out_of_private_memory(tmp_path):
    path = tmp_path / "index.faiss"
    vectors = np.random.default_rng(0).standard_normal((80_000, 128)).astype(np.float32)
    index = faiss.index_factory(128, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[:20_000])
    index.add(vectors)
    faiss.write_index(index, str(path))
    size = path.stat().st_size  # ~41 MB

    def measured(how: str) -> dict:
        command = [sys.executable, "-c", MEASURE, str(path), how]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    in_ram, mapped = measured("ram"), measured("mmap")
    assert mapped["ids"] == in_ram["ids"]
    assert in_ram["grew"] > 0.8 * size  # the measure sees an index read into RAM
    assert mapped["grew"] < size / 3, (mapped["grew"], size)  # faiss, BLAS and the direct map: some MB


# The whole build a server loads (index, mapping, captions: the Searcher's own loader), measured as
# above after the libraries are imported, then searched for 200 queries and 20 answers' rows joined.
MEASURE_BUILD = textwrap.dedent(
    """
    import json, pathlib, sys
    import numpy as np
    import pyarrow, pyarrow.parquet, pyarrow.ipc, faiss
    from rayclip.query import builds, knn
    from rayclip.query.knn import Residency

    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    root, model_version, build_id, mapped = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "mmap"
    pyarrow.chunked_array([[0]]).to_numpy()  # pyarrow's numpy conversion starts up once, whatever the build
    before = anon()
    build = builds.load_build(root, model_version, build_id, Residency(mmap=mapped))
    queries = np.random.default_rng(1).standard_normal((200, build.info.dim)).astype(np.float32)
    scores, ids = knn.search(build.knn, queries, 10, None)
    rows = build.mapping.rows(ids[:20].ravel(), ["media_id", "path", "url", "caption"])  # 20 answers' rows
    print(json.dumps({"grew": anon() - before, "ids": ids.tolist(), "rows": rows}))
    """
)


def test_a_mapped_server_keeps_its_whole_build_out_of_private_memory(tmp_path):
    root = tmp_path / "data"
    report = a_build(root, n=20_000, index_type="IVF64,Flat")  # 10 MB of index, a mapping of ~half that

    def measured(how: str) -> dict:
        command = [sys.executable, "-c", MEASURE_BUILD, str(root), report.model_version, report.build_id, how]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    in_ram, mapped = measured("ram"), measured("mmap")
    assert (mapped["ids"], mapped["rows"]) == (in_ram["ids"], in_ram["rows"])
    assert in_ram["grew"] > report.index_bytes  # the measure sees the index and its mapping read into RAM
    assert mapped["grew"] < report.index_bytes / 3, (mapped["grew"], report.index_bytes)


def test_a_mapped_flat_build_keeps_its_index_and_its_caption_index_out_of_private_memory(tmp_path):
    """Flat image and caption indexes (IndexFlatIP: FAISS reads their vectors into RAM under
    IO_FLAG_MMAP, and maps them under IO_FLAG_MMAP_IFC)."""
    import pyarrow as pa
    from helpers.silver import clustered, media_ids, normalised, reference_spec, write_manifest, write_silver

    from rayclip.stages import index
    from rayclip.store import layout, silver

    root, n = tmp_path / "data", 12_000
    ids = media_ids(n)
    model_version = reference_spec().model_version
    write_silver(root, "2026-01-01", ids, clustered(n, seed=3))
    write_manifest(root, ids)
    caption_ids = pa.array([f"c{i}" for i in range(n)])
    texts = pa.array([f"a photo number {i}" for i in range(n)])
    captions = silver.captions_table(caption_ids, texts, normalised(clustered(n, seed=4)))
    silver.write_run(root, model_version, "2026-01-01", [captions], layout.CAPTIONS)
    scored_at = captions["embedded_at"]
    scores = pa.table({"media_id": ids, "caption_id": caption_ids, "clip_score": [0.3] * n, "scored_at": scored_at})
    silver.write_run(root, model_version, "2026-01-01", [scores], layout.CLIP_SCORES)
    report = index.build(root, index_type="flat")
    folder = layout.build_dir(root, model_version, report.build_id)
    caption_bytes = layout.caption_index_file(folder).stat().st_size
    assert report.index_bytes > 5 * 2**20 and caption_bytes > 5 * 2**20  # 6 MB each

    def measured(how: str) -> dict:
        command = [sys.executable, "-c", MEASURE_BUILD, str(root), model_version, report.build_id, how]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    in_ram, mapped = measured("ram"), measured("mmap")
    assert (mapped["ids"], mapped["rows"]) == (in_ram["ids"], in_ram["rows"])
    assert in_ram["grew"] > report.index_bytes + caption_bytes
    assert mapped["grew"] < (report.index_bytes + caption_bytes) / 6, (mapped["grew"], report.index_bytes)


def test_a_shard_looks_its_global_ids_up(builds):
    held = TestClient(create_app(builds.sharded_root)).app.state.service.searcher().snapshot().knn
    whole = TestClient(create_app(builds.root)).app.state.service.searcher().snapshot().knn
    assert isinstance(whole, LocalIndex)
    ids = np.array([3999, 0, 2000, 1999, 17])
    np.testing.assert_array_equal(held.vectors(ids), whole.vectors(ids))


def test_a_build_on_an_object_store_is_mapped_from_the_local_cache(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = tmp_path / "data"
    for root in (s3_root, local):
        a_build(root, n=1200, index_type="IVF16,Flat")
    in_ram = TestClient(create_app(local))
    mapped = TestClient(create_app(s3_root, mmap=True))
    media_id = a_media_id(in_ram)
    assert without_build_ids(query_answers(mapped, media_id)) == without_build_ids(query_answers(in_ram, media_id))
    status = mapped.get("/api/status").json()
    assert status["mapped_index_bytes"] > 0 and maps_its_lists(mapped)
    copies = list((tmp_path / "cache").rglob("index.faiss"))  # what FAISS maps: this machine's copy
    assert [c.parent.name for c in copies] == [status["build_id"]]
    assert (copies[0].parent / "mapping.arrow").is_file()  # the mapping's serving copy, mapped from there too


def test_a_filter_keeps_only_its_rows_whatever_their_ids():
    """Allowed ids far below the index's last one: the selector never reads past its bitmap."""
    vectors = np.random.default_rng(2).standard_normal((5000, 16)).astype(np.float32)
    flat = faiss.IndexFlatIP(16)
    flat.add(vectors)
    allowed = np.array([3, 17, 40, 41, 99])
    for _ in range(20):  # memory past the bitmap differs from call to call
        scores, ids = knn.search(LocalIndex(flat, {}), vectors[:8], 5, allowed)
        assert set(ids.ravel()) == set(allowed)


def test_a_build_published_while_mapped_is_served_next_and_the_mapped_one_left_whole(tmp_path):
    from rayclip.stages import index
    from rayclip.store import layout

    root = tmp_path / "data"
    first = a_build(root, n=1200, index_type="IVF16,Flat")
    client = TestClient(create_app(root, mmap=True))
    before = query_answers(client, a_media_id(client))
    mapped = layout.index_file(layout.build_dir(root, first.model_version, first.build_id))
    size, written = mapped.stat().st_size, mapped.stat().st_mtime_ns
    second = index.build(root, index_type="IVF16,Flat", retrain=True, target_recall=0.9)
    after = query_answers(client, a_media_id(client))
    assert {a["build_id"] for a in after.values() if isinstance(a, dict)} == {second.build_id}
    assert client.get("/api/status").json()["mapped_index_bytes"] > 0 and maps_its_lists(client)
    assert (mapped.stat().st_size, mapped.stat().st_mtime_ns) == (size, written)  # a build's folder is its own
    assert without_build_ids(after) == without_build_ids(before)  # the same silver, built again
