"""The one query service behind /api/*, clip-retrieval's routes, the CLI and the Python API: one
Searcher per model_version, results labelled with the build they came from, the model loaded
before the port opens, and one status per kind of bad input. Made-up vectors (no Ray)."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.silver import clustered, media_ids, write_silver

from rayclip.errors import NoIndexError
from rayclip.http.api import MAX_K
from rayclip.http.app import create_app
from rayclip.options import DEFAULT_COLLAPSE, SearchOptions
from rayclip.query import searcher as searcher_module
from rayclip.query import service as service_module
from rayclip.query.searcher import Searcher
from rayclip.query.service import QueryService
from rayclip.query.terms import Term
from rayclip.stages import index
from rayclip.store import catalog, layout

MODEL_VERSION = "clip_rayclip_ref_reference"
ROWS = 60


def vectors_store(root, prefix: str = "", day: str = "2026-01-01", n: int = ROWS, seed: int = 0):
    ids = media_ids(n, prefix)
    write_silver(root, day, ids, clustered(n, seed=seed))
    return ids


@dataclass(frozen=True)
class ServiceStore:
    """A published build of made-up vectors: its data root, its BuildReport, its media_ids."""

    root: Path
    build: index.BuildReport
    ids: list[str]


@pytest.fixture(scope="module")
def service_store(tmp_path_factory) -> ServiceStore:
    root = tmp_path_factory.mktemp("service") / "data"
    ids = vectors_store(root)
    return ServiceStore(root, index.build(root), ids)


@pytest.fixture(scope="module")
def service_client(service_store):
    return TestClient(create_app(service_store.root, max_upload_bytes=50_000))


def mapping_of(root, build_id: str) -> list[str]:
    return (
        catalog.read_parquet(layout.mapping_file(layout.build_dir(root, MODEL_VERSION, build_id)))
        .column("media_id")
        .to_pylist()
    )


def first_search_blocked(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The next query's FAISS call waits for `release`; `entered` is set once it is waiting."""
    entered, release = threading.Event(), threading.Event()
    search = searcher_module._search

    def blocking_search(build, queries, k, allowed):
        if not entered.is_set():
            entered.set()
            assert release.wait(60)
        return search(build, queries, k, allowed)

    monkeypatch.setattr(searcher_module, "_search", blocking_search)
    return entered, release


def test_a_build_published_mid_query_never_mislabels_the_results(tmp_path, monkeypatch):
    """The query's FAISS call blocks; a full build with other rows is published and another request
    makes the shared Searcher switch to it; the blocked query must still name the build its
    faiss_ids and rows come from."""
    root = tmp_path / "data"
    ids = vectors_store(root)
    first = index.build(root)
    service_client = TestClient(create_app(root))
    entered, release = first_search_blocked(monkeypatch)
    body = {"terms": [{"media_id": ids[7]}], "k": 10}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(service_client.post, "/api/search", json=body)
        assert entered.wait(60)
        vectors_store(root, prefix="later", day="2025-06-01", seed=1)  # sorts first: other faiss_ids
        second = index.build(root, retrain=True)
        assert service_client.get("/api/status").json()["build_id"] == second.build_id  # the Searcher moved on
        release.set()
        response = pending.result(60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["build_id"] == first.build_id and answer["model_version"] == MODEL_VERSION
    old, new = mapping_of(root, first.build_id), mapping_of(root, second.build_id)
    rows = [(r["faiss_id"], r["media_id"]) for r in answer["results"]]
    assert rows[0][1] == ids[7] and all(old[i] == m for i, m in rows)
    assert any(new[i] != m for i, m in rows)  # the other build would have told another story
    after = service_client.post("/api/search", json=body).json()
    assert after["build_id"] == second.build_id and all(new[r["faiss_id"]] == r["media_id"] for r in after["results"])


def test_knn_service_names_the_build_its_ids_come_from(tmp_path, monkeypatch):
    root = tmp_path / "data"
    vectors_store(root)
    first = index.build(root)
    service_client = TestClient(create_app(root))
    entered, release = first_search_blocked(monkeypatch)
    query = {"embedding_input": clustered(1, seed=9)[0].tolist(), "num_images": 5, "indice_name": MODEL_VERSION}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(service_client.post, "/knn-service", content=json.dumps(query))
        assert entered.wait(60)
        vectors_store(root, prefix="later", day="2025-06-01", seed=1)
        second = index.build(root, retrain=True)
        assert service_client.get("/indices-list").status_code == 200
        assert service_client.post("/metadata", json={"ids": [0]}).headers["X-Rayclip-Build-Id"] == second.build_id
        release.set()
        response = pending.result(60)
    assert response.status_code == 200, response.text
    assert response.headers["X-Rayclip-Build-Id"] == first.build_id
    old = mapping_of(root, first.build_id)
    assert all(old[r["id"]] == r["media_id"] for r in response.json())
    stale = service_client.post("/metadata", json={"ids": [0], "build_id": first.build_id})
    assert stale.status_code == 409  # the ids of the old build cannot be looked up in the new one


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/search", '{"terms": [{"text": "a dog", "weight": NaN}]}'),
        ("/api/search", '{"terms": [{"text": "a dog", "weight": Infinity}]}'),
        ("/api/search", '{"terms": [{"text": "a dog"}], "collapse": -Infinity}'),
        ("/knn-service", '{"embedding_input": [NaN' + ", 0.1" * 127 + "]}"),
        ("/knn-service", '{"embedding_input": [0.1, Infinity' + ", 0.1" * 126 + "]}"),
    ],
)
def test_non_finite_numbers_are_one_line_422s(service_client, path, body):
    response = service_client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "finite number" in detail


def test_the_model_is_loaded_before_the_first_request(service_store, monkeypatch):
    opened = []
    load_searcher = Searcher.load.__func__

    def counted(cls, *args, **kwargs):
        opened.append(args)
        return load_searcher(cls, *args, **kwargs)

    monkeypatch.setattr(Searcher, "load", classmethod(counted))
    app = create_app(service_store.root)
    assert opened == []  # creating the app loads nothing (tests, `--help`)
    with TestClient(app) as service_client:  # runs the startup, as uvicorn does before it listens
        assert len(opened) == 1 and app.state.service.cached() is not None
        assert service_client.get("/healthz").json() == {"ok": True}
        assert service_client.get("/api/search", params={"q": "a dog"}).status_code == 200
        assert len(opened) == 1  # the first query found it open


def test_the_page_starts_from_the_servers_search_defaults(service_client):
    assert service_client.get("/api/defaults").json() == {
        "k": SearchOptions.k,
        "collapse": DEFAULT_COLLAPSE,
        "max_k": MAX_K,
    }
    page = service_client.get("/").text + service_client.get("/static/app.js").text
    assert "/api/defaults" in page
    assert str(DEFAULT_COLLAPSE) not in page and "<option" not in page  # no default of its own


def test_startup_without_an_index_still_serves_and_answers_503(tmp_path):
    app = create_app(tmp_path / "empty")
    with TestClient(app) as service_client:
        assert service_client.get("/healthz").json() == {"ok": True}
        response = service_client.get("/api/search", params={"q": "a dog"})
        assert response.status_code == 503 and "rayclip index" in response.json()["detail"]


def test_one_searcher_for_api_and_clip_back_and_no_gold_listing_per_request(service_store, monkeypatch):
    app = create_app(service_store.root)
    service_client = TestClient(app)
    used, listings = [], []
    find, listing = Searcher.find, catalog.gold_model_versions

    def recorded(self, queries, options=None):
        used.append(self)
        return find(self, queries, options)

    def counted(root, *args, **kwargs):
        listings.append(root)
        return listing(root, *args, **kwargs)

    monkeypatch.setattr(Searcher, "find", recorded)
    monkeypatch.setattr(catalog, "gold_model_versions", counted)
    assert service_client.get("/api/search", params={"q": "a dog"}).status_code == 200  # opens: one listing
    listings.clear()
    vector = clustered(1, seed=3)[0].tolist()
    requests = [
        lambda: service_client.get("/api/search", params={"q": "a cat"}),
        lambda: service_client.post(
            "/knn-service", content=json.dumps({"text": "a cat", "indice_name": MODEL_VERSION})
        ),
        lambda: service_client.post("/knn-service", content=json.dumps({"embedding_input": vector})),
        lambda: service_client.post("/api/search", json={"terms": [{"text": "a bird"}]}),
        lambda: service_client.post("/metadata", json={"ids": [0, 1], "indice_name": MODEL_VERSION}),
    ]
    for request in requests:
        assert request().status_code == 200
    assert listings == []  # CURRENT is read per request, gold/ is not listed
    assert len(used) == 5 and all(s is used[0] for s in used)
    assert app.state.service.cached(MODEL_VERSION) is used[0]
    assert service_client.get("/indices-list").json() == [MODEL_VERSION] and listings == []


def test_an_unknown_name_lists_gold_again_and_finds_a_new_model_version(tmp_path):
    import shutil

    root = tmp_path / "data"
    vectors_store(root)
    index.build(root)
    service = QueryService(root)
    assert service.names() == [MODEL_VERSION]
    shutil.copytree(root / "gold" / MODEL_VERSION, root / "gold" / "second_version")
    assert service.names() == [MODEL_VERSION]  # cached
    assert service.searcher("second_version").model_version == "second_version"
    assert service.names() == [MODEL_VERSION, "second_version"]
    (root / "gold" / "second_version" / "CURRENT").unlink()
    with pytest.raises(NoIndexError):
        service.searcher("second_version")
    assert service.names() == [MODEL_VERSION]


def not_an_image() -> str:
    return base64.b64encode(b"<html>not an image</html>").decode()


@pytest.mark.parametrize(
    "send, status, message",
    [
        (lambda c: c.post("/api/search/image", files={"file": ("x.jpg", b"<html>", "image/jpeg")}), 415, "decode"),
        (lambda c: c.post("/api/search/image", files={"file": ("x.jpg", b"", "image/jpeg")}), 415, "empty"),
        (lambda c: c.post("/api/search", json={"terms": [{"image": not_an_image()}]}), 415, "decode"),
        (lambda c: c.post("/api/search", json={"terms": [{"image": "not base64!"}]}), 422, "base64"),
        (lambda c: c.post("/api/search", json={"terms": [{"image": 12}]}), 422, "string"),
        (lambda c: c.post("/api/search", json={"terms": [{"image": "A" * 80_000}]}), 413, "larger than"),
        (lambda c: c.post("/knn-service", content=json.dumps({"image": not_an_image()})), 415, "decode"),
        (lambda c: c.post("/knn-service", content=json.dumps({"image": "not base64!"})), 422, "base64"),
        (lambda c: c.post("/knn-service", content=json.dumps({"image": ["x"]})), 422, "string"),
        (lambda c: c.post("/knn-service", content=json.dumps({"image": "A" * 80_000})), 413, "larger than"),
    ],
)
def test_bad_images_get_the_same_status_on_every_route(service_client, send, status, message):
    response = send(service_client)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and message in response.json()["detail"]


def test_an_image_the_store_does_not_hold_is_404_and_a_malformed_media_id_422(service_client):
    missing = service_client.get("/api/images/" + "0" * 64)
    assert (missing.status_code, missing.json()) == (404, {"detail": "no image " + "0" * 64})
    malformed = service_client.get("/api/images/not-hex")
    assert malformed.status_code == 422
    assert malformed.json() == {"detail": "media_id must be 64 lowercase hex characters"}


def test_the_service_and_the_searcher_answer_alike(service_store):
    root, built, ids = service_store.root, service_store.build, service_store.ids
    service = QueryService(root)
    options = SearchOptions(k=5)
    served = service.search([Term("media_id", ids[3])], options)
    assert served.build_id == built.build_id and served.model_version == MODEL_VERSION
    direct = service_module.search([Term("media_id", ids[3])], options, data_dir=root)
    assert [(r.faiss_id, r.media_id, r.score) for r in direct] == [(r.faiss_id, r.media_id, r.score) for r in served]
    searcher = service.searcher()
    vector = searcher.vectors([3])
    assert np.allclose(np.linalg.norm(vector, axis=1), 1.0)
    assert searcher.search_vectors(vector, 5)[0] == searcher.find([[Term("vector", vector[0])]], options)[0]
    assert searcher.build_info.build_id == built.build_id and searcher.build_info.count == ROWS


def test_several_model_versions_are_one_404_that_says_how_each_caller_names_one(tmp_path, capsys):
    import shutil

    from rayclip import cli
    from rayclip.errors import UnknownModelVersionError

    root = tmp_path / "data"
    vectors_store(root)
    index.build(root)
    shutil.copytree(root / "gold" / MODEL_VERSION, root / "gold" / "second_version")
    present = f"({MODEL_VERSION}, second_version)"
    with TestClient(create_app(root)) as service_client:
        api = service_client.get("/api/search", params={"q": "a dog"})
        clip = service_client.post("/knn-service", content=json.dumps({"text": "a dog"}))
    assert (api.status_code, clip.status_code) == (404, 404)  # one status, whichever route asks
    assert present in api.json()["detail"] and "rayclip serve --model-version" in api.json()["detail"]
    assert present in clip.json()["detail"] and "pick one with indice_name" in clip.json()["detail"]
    assert "--model-version" not in clip.json()["detail"]  # a service_client cannot pass a CLI flag
    with pytest.raises(UnknownModelVersionError, match=r"pick one with model_version=$"):
        Searcher.open(root)
    assert cli.main(["search", "--data-dir", str(root), "--q", "a dog"]) == 2
    assert capsys.readouterr().err.endswith(
        f"several model_versions present {present}; pick one with --model-version\n"
    )


def resolutions(monkeypatch) -> list[tuple]:
    """Every data_root() call from now on, whoever makes it, as its arguments."""
    from rayclip.store import storage
    from rayclip.store.storage import locations

    resolved, data_root = [], storage.data_root

    def resolving(*args, **kwargs):
        resolved.append(args)
        return data_root(*args, **kwargs)

    for module in (storage, locations):  # callers through storage, and resolved() and location()
        monkeypatch.setattr(module, "data_root", resolving)
    return resolved


def test_a_request_resolves_the_data_root_once_and_lists_gold_once(service_store, monkeypatch):
    from rayclip.store import storage

    resolved, listed = resolutions(monkeypatch), []
    children = storage.children

    def listing(loc):
        if loc.name == "gold":
            listed.append(loc)
        return children(loc)

    monkeypatch.setattr(storage, "children", listing)
    with TestClient(
        create_app(str(service_store.root))
    ) as service_client:  # opens the Searcher before the first request
        assert service_client.get("/api/search", params={"q": "a dog"}).status_code == 200
    assert len(resolved) == 1 and len(listed) == 1


def test_a_command_run_from_the_cli_resolves_the_data_root_once(tmp_path, monkeypatch):
    from rayclip import cli

    root = tmp_path / "data"
    vectors_store(root)
    resolved = resolutions(monkeypatch)
    assert cli.main(["index", "--data-dir", str(root)]) == 0
    assert cli.main(["index", "--data-dir", str(root), "--rollback"]) == 2  # one build: nothing before it
    monkeypatch.setattr("uvicorn.run", lambda app, **options: TestClient(app).__enter__())  # opens, not served
    assert cli.main(["serve", "--data-dir", str(root)]) == 0
    assert resolved == [(str(root),)] * 3


def test_a_location_data_root_made_is_used_as_it_is_and_a_callers_own_upath_is_made_again():
    """resolved(): once resolved at the edge, never again; but a UPath a script built itself would
    cache listings (another process's commits unseen), so it is made again as data_root makes one."""
    from upath import UPath

    from rayclip.store import storage

    made = storage.data_root("memory://bucket/root")
    assert storage.resolved(made) is made
    own = UPath("memory://bucket/root")
    again = storage.resolved(own)
    assert again is not own and again.storage_options.get("use_listings_cache") is False
    assert storage.uri(again) == storage.uri(made)
