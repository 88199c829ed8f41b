"""clip-retrieval's back-end protocol on `rayclip serve`: the bodies its ClipClient and web front
send, checked against our own /api routes, plus its real gold_client and its real front (Chromium)."""

from __future__ import annotations

import base64
import functools
import http.server
import ipaddress
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from helpers import loopback
from helpers.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from helpers.clip_retrieval import CLIP_RETRIEVAL, NOT_FETCHED, clip_client_module, serving_live
from helpers.ports import free_port
from helpers.silver import media_ids, normalised, write_silver
from helpers.site import GOOD_IMAGES
from helpers.stores import a_media

from rayclip import synthetic
from rayclip.cli import build_parser
from rayclip.http import clip_back
from rayclip.http.app import create_app
from rayclip.images import ImageTooLargeError, decode_image
from rayclip.options import DEFAULT_COLLAPSE
from rayclip.stages import index

MODEL_VERSION = "clip_rayclip_ref_reference"


def clip_client_body(indice_name: str | None, num_images: int = 40, deduplicate: bool = True, **query) -> dict:
    """What ClipClient(url, indice_name, num_images=…, deduplicate=…).query(…) posts, key for key
    (clip-retrieval 2.45 clip_client.py, __search_knn_api__), with its other defaults."""
    return {
        "text": query.get("text"),
        "image": query.get("image"),
        "image_url": query.get("image_url"),
        "embedding_input": query.get("embedding_input"),
        "deduplicate": deduplicate,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": indice_name,
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": num_images,
        # num_results_ids is hardcoded to the num_images parameter.
        "num_result_ids": num_images,
    }


def front_body(text: str, indice_name: str, num_images: int = 40, num_result_ids: int = 3000) -> dict:
    """What the clip-retrieval front's callClipService posts for a text search (its defaults)."""
    return {
        "text": text,
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "modality": "image",
        "num_images": num_images,
        "indice_name": indice_name,
        "num_result_ids": num_result_ids,
        "use_mclip": False,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "aesthetic_score": "",
        "aesthetic_weight": "0.5",
    }


def knn(gold_client: TestClient, body: dict, **headers):
    # Both clients post a JSON string without a JSON content type (requests' data=, the browser's fetch).
    return gold_client.post("/knn-service", content=json.dumps(body), headers=headers)


@pytest.fixture(scope="module")
def gold_client(gold_store):
    return TestClient(create_app(gold_store.root))


def ours(results: list[dict]) -> list[tuple[str, float]]:
    return [(r["media_id"], r["score"]) for r in results]


def theirs(results: list[dict]) -> list[tuple[str, float]]:
    return [(r["media_id"], r["similarity"]) for r in results]


def faiss_ids(gold_store, results: list[dict]) -> list[int]:
    mapping = pq.read_table(Path(gold_store.build.path) / "mapping.parquet").to_pylist()
    by_media = {row["media_id"]: row["faiss_id"] for row in mapping}
    return [by_media[r["media_id"]] for r in results]


@pytest.mark.parametrize("deduplicate", [False, True])
def test_clip_client_text_body_equals_api_search(gold_client, gold_store, deduplicate):
    text = "a large red circle on the left on a white background"
    response = knn(gold_client, clip_client_body(MODEL_VERSION, num_images=10, deduplicate=deduplicate, text=text))
    assert response.status_code == 200, response.text
    got = response.json()
    params = {"q": text, "k": 10} | ({"collapse": DEFAULT_COLLAPSE} if deduplicate else {})
    expected = gold_client.get("/api/search", params=params).json()["results"]
    assert theirs(got) == ours(expected) and len(got) == 10
    assert [r["id"] for r in got] == faiss_ids(gold_store, expected)
    assert [(r["url"], r["caption"]) for r in got] == [(r["url"], r["caption"]) for r in expected]
    assert response.headers["X-Rayclip-Build-Id"] == gold_store.build.build_id
    assert [r.get("duplicates") for r in got] == [r["duplicates"] if deduplicate else None for r in expected]


def test_clip_client_base64_image_body_equals_image_upload(gold_client, gold_store):
    row = a_media(gold_store.root)
    data = (gold_store.root / row["path"]).read_bytes()
    body = clip_client_body(MODEL_VERSION, num_images=5, deduplicate=False, image=base64.b64encode(data).decode())
    got = knn(gold_client, body).json()
    expected = gold_client.post("/api/search/image", params={"k": 5}, files={"file": ("q.jpg", data, "image/jpeg")})
    assert theirs(got) == ours(expected.json()["results"]) and got[0]["media_id"] == row["media_id"]


def test_clip_client_embedding_body_equals_image_upload(gold_client, gold_store, gold_searcher):
    row = a_media(gold_store.root)
    data = (gold_store.root / row["path"]).read_bytes()
    vector = gold_searcher.model.encode_images([decode_image(data)])[0]
    body = clip_client_body(MODEL_VERSION, num_images=6, deduplicate=False, embedding_input=vector.tolist())
    got = knn(gold_client, body).json()
    expected = gold_client.post("/api/search/image", params={"k": 6}, files={"file": ("q.jpg", data, "image/jpeg")})
    assert theirs(got) == ours(expected.json()["results"])


@dataclass(frozen=True)
class FourCopies:
    client: TestClient  # the app over a flat build of the vectors
    bases: np.ndarray  # the 12 unrelated vectors: faiss_ids g, g+12, g+24, g+36 are near-copies of base g


@pytest.fixture(scope="module")
def four_copies_of_twelve(tmp_path_factory) -> FourCopies:
    """Made-up vectors: 12 unrelated ones, each with 3 near-copies (cosine about 0.99)."""
    rng = np.random.default_rng(5)
    bases = normalised(rng.standard_normal((12, 128)))
    vectors = np.concatenate([bases + rng.standard_normal(bases.shape) * 0.01 for _ in range(4)])
    root = tmp_path_factory.mktemp("dups") / "data"
    write_silver(root, "2026-01-01", media_ids(len(vectors)), vectors)
    index.build(root)
    return FourCopies(TestClient(create_app(root)), bases)


@pytest.mark.parametrize("deduplicate", [False, True])
def test_clip_client_deduplicate_folds_near_duplicates(four_copies_of_twelve, deduplicate):
    client, bases = four_copies_of_twelve.client, four_copies_of_twelve.bases
    query = normalised((bases[0] + 0.5 * bases[1])[None])[0].tolist()
    body = clip_client_body(MODEL_VERSION, num_images=4, deduplicate=deduplicate, embedding_input=query)
    got = knn(client, body).json()
    groups = [r["id"] % 12 for r in got]  # faiss_id i is vector i: copies of base g sit at g, g+12, g+24, g+36
    if deduplicate:
        assert len(set(groups)) == 4 and [r["duplicates"] for r in got][:2] == [3, 3]
    else:
        assert groups == [0, 0, 0, 0] and all("duplicates" not in r for r in got)


def test_metadata_round_trips_ids(gold_client, gold_store):
    got = knn(gold_client, clip_client_body(MODEL_VERSION, num_images=8, text="a small blue star")).json()
    ids = [r["id"] for r in got]
    response = gold_client.post("/metadata", content=json.dumps({"ids": ids[::-1], "indice_name": MODEL_VERSION}))
    assert response.status_code == 200 and response.headers["X-Rayclip-Build-Id"] == gold_store.build.build_id
    assert response.json() == [
        {"id": r["id"], "metadata": {"media_id": r["media_id"], "url": r["url"], "caption": r["caption"]}}
        for r in got[::-1]
    ]
    same_build = {"ids": ids[:1], "indice_name": MODEL_VERSION, "build_id": gold_store.build.build_id}
    assert gold_client.post("/metadata", json=same_build).status_code == 200
    stale = gold_client.post("/metadata", json=same_build | {"build_id": "20200101T000000.000000Z-abcdef"})
    assert stale.status_code == 409 and "search again" in stale.json()["detail"]
    assert stale.headers["X-Rayclip-Build-Id"] == gold_store.build.build_id
    outside = gold_client.post("/metadata", json={"ids": [0, GOOD_IMAGES], "indice_name": MODEL_VERSION})
    assert outside.status_code == 422 and f"id {GOOD_IMAGES} is not in build" in outside.json()["detail"]
    assert gold_client.post("/metadata", json={"ids": [], "indice_name": MODEL_VERSION}).json() == []


def test_front_body_as_text_plain_gets_metadata_for_num_images_then_ids(gold_client):
    body = front_body("a green square", MODEL_VERSION, num_images=5, num_result_ids=20)
    response = knn(gold_client, body, **{"Content-Type": "text/plain;charset=UTF-8"})
    assert response.status_code == 200, response.text
    got = response.json()
    assert len(got) == 20 and len({r["id"] for r in got}) == 20
    assert all({"url", "caption", "media_id"} <= set(r) for r in got[:5])
    assert all(set(r) == {"id", "similarity", "duplicates"} for r in got[5:])  # the front asks /metadata later
    assert [r["similarity"] for r in got] == sorted((r["similarity"] for r in got), reverse=True)
    assert response.headers["X-Rayclip-Ignored-Flags"] == "use_safety_model, use_violence_detector"


def test_ignored_flags_are_named_in_a_header(gold_client):
    body = clip_client_body(MODEL_VERSION, num_images=3, text="a red circle")
    response = knn(gold_client, body | {"use_mclip": True})
    ignored = "use_mclip, use_safety_model, use_violence_detector, aesthetic_score, aesthetic_weight"
    assert response.headers["X-Rayclip-Ignored-Flags"] == ignored
    quiet = {"text": "a red circle", "num_images": 3, "indice_name": MODEL_VERSION}
    response = knn(gold_client, quiet)
    assert response.status_code == 200 and "X-Rayclip-Ignored-Flags" not in response.headers


def test_indices_list_and_any_published_model_version(gold_store, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root, ignore=shutil.ignore_patterns("bronze"))
    shutil.copytree(root / "gold" / MODEL_VERSION, root / "gold" / "second_version")
    (root / "gold" / "unpublished" / "builds").mkdir(parents=True)  # no CURRENT: not an index
    several = TestClient(create_app(root))
    assert several.get("/indices-list").json() == [MODEL_VERSION, "second_version"]
    got = knn(several, clip_client_body("second_version", num_images=3, text="a red circle"))
    assert got.status_code == 200 and len(got.json()) == 3
    unnamed = knn(several, clip_client_body(None, num_images=3, text="a red circle"))
    assert unnamed.status_code == 404 and "pick one with indice_name" in unnamed.json()["detail"]


def test_openapi_documents_the_routes(gold_client):
    paths = gold_client.get("/openapi.json").json()["paths"]
    assert {"/indices-list", "/knn-service", "/metadata"} <= set(paths)
    schema = gold_client.get("/openapi.json").json()["components"]["schemas"]["KnnQuery"]["properties"]
    assert {"num_images", "num_result_ids", "modality", "indice_name", "deduplicate", "embedding_input"} <= set(schema)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"indice_name": "laion5B", "text": "cat"}, 404, f"'laion5B'; present: {MODEL_VERSION} (name one with indice"),
        ({"embedding_input": [0.1] * 5}, 422, "embedding_input has 5 numbers; this index needs 128"),
        ({"embedding_input": [0.0] * 128}, 422, "embedding_input must be finite and not all zero"),
        ({}, 422, "give exactly one of text, image, image_url, embedding_input; got none"),
        ({"text": "", "image": None}, 422, "give exactly one of text, image, image_url, embedding_input; got none"),
        ({"text": "cat", "image": "AAAA"}, 422, "; got text and image"),
        ({"image": "not base64!"}, 422, "image is not valid base64"),
        ({"image": base64.b64encode(b"<html>").decode()}, 415, "cannot read the query image"),
        ({"text": "   "}, 422, "the query is empty"),
        ({"text": "cat", "num_images": "many"}, 422, "num_images: Input should be a valid integer"),
        ({"text": "cat", "num_images": 10_001}, 422, "num_images: Input should be less than or equal to 10000"),
        ({"image_url": "http://example.com/a.jpg"}, 422, "start the server with --allow-url-queries"),
    ],
)
def test_bad_requests_get_one_clear_message(gold_client, loopback_only, body, status, message):
    response = knn(gold_client, clip_client_body(MODEL_VERSION) | body)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and message in response.json()["detail"]
    assert loopback_only == []  # the image_url refused without a DNS query or a connection


def test_unparseable_body_is_one_clear_message(gold_client):
    response = gold_client.post("/knn-service", content="{not json")
    assert response.status_code == 422 and response.json()["detail"] == "the body is not valid JSON"


def test_serve_images_points_urls_at_our_copies(gold_store):
    client = TestClient(create_app(gold_store.root, serve_images=True))
    got = knn(client, clip_client_body(MODEL_VERSION, num_images=2, text="a red circle")).json()
    assert [r["url"] for r in got] == [f"http://testserver/api/images/{r['media_id']}" for r in got]
    picture = client.get(got[0]["url"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    metadata = client.post("/metadata", json={"ids": [got[0]["id"]], "indice_name": MODEL_VERSION}).json()
    assert metadata[0]["metadata"]["url"] == got[0]["url"]


def test_cors_only_for_the_origins_given(gold_store):
    front = "http://127.0.0.1:9999"
    preflight = {"Origin": front, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-key"}
    closed = TestClient(create_app(gold_store.root))
    assert "access-control-allow-origin" not in closed.options("/knn-service", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/indices-list", headers={"Origin": front}).headers
    opened = TestClient(create_app(gold_store.root, cors_origins=[front]))
    assert opened.options("/knn-service", headers=preflight).headers["access-control-allow-origin"] == front
    simple = opened.get("/indices-list", headers={"Origin": front})
    assert simple.headers["access-control-allow-origin"] == front
    assert "access-control-allow-origin" not in opened.get("/indices-list", headers={"Origin": "http://evil"}).headers
    anyone = TestClient(create_app(gold_store.root, cors_origins=["*"]))
    assert anyone.get("/indices-list", headers={"Origin": "http://evil"}).headers["access-control-allow-origin"] == "*"
    response = knn(opened, clip_client_body(MODEL_VERSION, num_images=1, text="a red circle"), Origin=front)
    assert "X-Rayclip-Ignored-Flags" in response.headers["access-control-expose-headers"]


def test_serve_flags_parse():
    args = build_parser().parse_args(
        ["serve", "--cors-origin", "http://a", "--cors-origin", "*", "--allow-url-queries", "--serve-images"]
    )
    assert args.cors_origin == ["http://a", "*"] and args.allow_url_queries and args.serve_images
    plain = build_parser().parse_args(["serve"])
    assert plain.cors_origin == [] and not plain.allow_url_queries and not plain.serve_images


def test_rayclip_serve_passes_the_new_flags_through(gold_store):
    import subprocess
    import sys

    import httpx

    port, front = free_port(), "http://127.0.0.1:9"
    flags = ["--cors-origin", front, "--allow-url-queries", "--serve-images"]
    cmd = [
        sys.executable,
        "-m",
        "rayclip.cli",
        "serve",
        "--data-dir",
        str(gold_store.root),
        "--port",
        str(port),
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    back = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                listed = httpx.get(f"{back}/indices-list", headers={"Origin": front}, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert listed.json() == [MODEL_VERSION] and listed.headers["access-control-allow-origin"] == front
        body = clip_client_body(MODEL_VERSION, num_images=1, text="a red circle")
        got = httpx.post(f"{back}/knn-service", content=json.dumps(body), timeout=60).json()
        assert got[0]["url"] == f"{back}/api/images/{got[0]['media_id']}"
        body = clip_client_body(MODEL_VERSION, image_url=f"{back}/healthz")
        refused = httpx.post(f"{back}/knn-service", content=json.dumps(body), timeout=60)
        assert refused.status_code == 422 and "non-public address" in refused.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------ image_url: no SSRF


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Loopback test site: /image.jpg, /big, /slow, /hop/N (redirect chain), /to?url=… (redirect)."""

    seen: list[tuple[str, str]] = []
    image = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers["Host"]))
        if self.path.startswith("/to?url="):
            return self._redirect(self.path.split("=", 1)[1])
        if self.path.startswith("/hop/"):
            return self._redirect(f"/hop/{int(self.path.rsplit('/', 1)[1]) + 1}")
        if self.path == "/slow":
            time.sleep(3)
        body = self.image if self.path in ("/image.jpg", "/slow") else b"\0" * 50_000
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()  # no Content-Length: the size limit must hold while streaming
        self.wfile.write(body)
        self.close_connection = True

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def recorder(gold_store):
    _Recorder.image = (gold_store.root / a_media(gold_store.root)["path"]).read_bytes()
    with loopback.serving(_Recorder) as server:
        yield server.server_address[1]


@pytest.fixture(scope="module")
def url_client(gold_store):
    return TestClient(create_app(gold_store.root, allow_url_queries=True))


@pytest.fixture
def loopback_only(monkeypatch):
    """Refuse (and record) any connection beyond loopback and any DNS query, so that even a broken
    check sends nothing off this machine. Literal addresses and localhost still resolve."""
    attempts = []
    connect, resolve = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if not ipaddress.ip_address(address[0]).is_loopback:
            attempts.append(address[0])
            raise OSError(f"test guard: no connections to {address[0]}")
        return connect(sock, address)

    def guarded_resolve(host, *args, **kwargs):
        if host != "localhost" and not (host.replace(".", "").isdigit() or ":" in host):
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no DNS query for {host}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_resolve)
    return attempts


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/image.jpg",
        "http://localhost:{port}/image.jpg",
        "http://[::1]:{port}/image.jpg",
        "http://[::ffff:127.0.0.1]:{port}/image.jpg",
        "http://0.0.0.0:{port}/image.jpg",
        "http://10.1.2.3/image.jpg",
        "http://192.168.0.1/image.jpg",
        "http://172.16.0.1/image.jpg",
        "http://100.64.0.1/image.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/image.jpg",
        "http://224.0.0.1/image.jpg",
        "http://2130706433:{port}/image.jpg",  # 127.0.0.1 as one number
    ],
)
def test_url_queries_never_reach_private_addresses(url_client, recorder, loopback_only, url):
    _Recorder.seen.clear()
    response = knn(url_client, {"image_url": url.format(port=recorder), "indice_name": MODEL_VERSION})
    assert response.status_code == 422, response.text
    assert "resolves to a non-public address" in response.json()["detail"]
    assert _Recorder.seen == [] and loopback_only == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://127.0.0.1/x.jpg", "must be an http(s) URL"),
        ("file:///etc/passwd", "must be an http(s) URL"),
        ("http:///x.jpg", "must be an http(s) URL"),
        ("http://no-such-host.invalid/x.jpg", "does not resolve"),  # the guard answers: no DNS query leaves
    ],
)
def test_url_queries_need_a_resolvable_http_url(url_client, loopback_only, url, message):
    response = knn(url_client, {"image_url": url, "indice_name": MODEL_VERSION})
    assert response.status_code == 422 and message in response.json()["detail"]


def only(*addresses: str):
    return lambda address: str(address) in addresses


def test_fetch_connects_to_the_checked_address_with_the_host_named(recorder, monkeypatch):
    """A name that resolves to an allowed address when checked and to another one after (DNS
    rebinding): the fetch must still go to the address it checked, naming the host in Host."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)  # nothing listens on 127.0.0.2

    def rebinding(host, *args, **kwargs):
        return real(next(answers) if host == "rebind.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    _Recorder.seen.clear()
    data = clip_back.fetch_image(f"http://rebind.test:{recorder}/image.jpg", 1 << 20, allowed=only("127.0.0.1"))
    assert data == _Recorder.image and _Recorder.seen == [("/image.jpg", f"rebind.test:{recorder}")]


def test_fetch_checks_every_redirect_and_limits_size_time_and_hops(recorder):
    base = f"http://127.0.0.1:{recorder}"
    allowed = only("127.0.0.1")
    assert clip_back.fetch_image(f"{base}/to?url=/image.jpg", 1 << 20, allowed=allowed) == _Recorder.image
    _Recorder.seen.clear()
    cases = [
        (f"{base}/to?url=http://127.0.0.2:{recorder}/image.jpg", 422, "non-public address (127.0.0.2)"),
        (f"{base}/hop/0", 422, "redirected more than 3 times"),
    ]
    for url, status, message in cases:
        with pytest.raises(HTTPException) as refused:
            clip_back.fetch_image(url, 10_000, allowed=allowed)
        assert refused.value.status_code == status and message in refused.value.detail, url
    assert "/image.jpg" not in [path for path, _ in _Recorder.seen]  # the redirect to 127.0.0.2 was not followed
    with pytest.raises(ImageTooLargeError, match="image_url larger than 10000 bytes"):
        clip_back.fetch_image(f"{base}/big", 10_000, allowed=allowed)
    started = time.monotonic()
    with pytest.raises(HTTPException) as slow:
        clip_back.fetch_image(f"{base}/slow", 1 << 20, timeout_s=0.5, allowed=allowed)
    assert slow.value.status_code == 422 and time.monotonic() - started < 2.5


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An image body one byte every 0.2 s for 3 s: never idle long enough for a read timeout."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        self.close_connection = True
        try:
            for _ in range(15):
                self.wfile.write(b"\0")
                time.sleep(0.2)
        except OSError:
            pass  # the gold_client hung up, as it should

    def log_message(self, *args) -> None:
        pass


def test_fetch_gives_up_at_its_total_deadline_while_bytes_keep_coming():
    """fetch_image's own deadline, not httpx's read timeout: every read gets a byte within 0.2 s of a
    1 s timeout, but the whole body would take 3 s."""
    with loopback.serving(_Trickle) as server:
        url = f"{loopback.url(server)}/trickle.jpg"
        started = time.monotonic()
        with pytest.raises(HTTPException) as slow:
            clip_back.fetch_image(url, 1 << 20, timeout_s=1.0, allowed=only("127.0.0.1"))
        elapsed = time.monotonic() - started
    assert slow.value.status_code == 422 and slow.value.detail == "image_url took too long to download"
    assert 1.0 <= elapsed < 2.5  # the whole body would take 3 s


def test_url_query_end_to_end_equals_base64_query(gold_store, recorder, monkeypatch):
    # The public-address rule is the one thing swapped: loopback is all a test may reach.
    monkeypatch.setattr(clip_back, "is_public_address", only("127.0.0.1"))
    client = TestClient(create_app(gold_store.root, allow_url_queries=True))
    by_url = knn(client, clip_client_body(MODEL_VERSION, 5, False, image_url=f"http://127.0.0.1:{recorder}/image.jpg"))
    by_bytes = knn(client, clip_client_body(MODEL_VERSION, 5, False, image=base64.b64encode(_Recorder.image).decode()))
    assert by_url.status_code == 200, by_url.text
    assert by_url.json() == by_bytes.json()


def test_an_image_url_over_the_size_limit_is_413_like_any_image(gold_store, recorder, monkeypatch):
    """The status comes from http/errors.STATUS, as for an upload or a base64 field over the limit."""
    monkeypatch.setattr(clip_back, "is_public_address", only("127.0.0.1"))
    client = TestClient(create_app(gold_store.root, max_upload_bytes=10_000, allow_url_queries=True))
    response = knn(client, {"image_url": f"http://127.0.0.1:{recorder}/big", "indice_name": MODEL_VERSION})
    assert (response.status_code, response.json()) == (413, {"detail": "image_url larger than 10000 bytes"})


# ------------------------------------------------------------------ clip-retrieval's own client and front


def test_clip_retrieval_client_queries_rayclip(live_gold, gold_client):
    module = clip_client_module()
    back = live_gold.url
    clip = module.ClipClient(url=f"{back}/knn-service", indice_name=MODEL_VERSION, num_images=10)
    got = clip.query(text="a large red circle")
    expected = gold_client.get("/api/search", params={"q": "a large red circle", "k": 10, "collapse": DEFAULT_COLLAPSE})
    assert theirs(got) == ours(expected.json()["results"])
    assert {"id", "similarity", "url", "caption"} <= set(got[0])


def test_clip_retrieval_front_shows_results_in_chromium(gold_store, tmp_path):
    """With --serve-images the front loads the store's own copies (/api/images/…): the shared gold
    store's original URLs may be another test worker's site."""
    front = CLIP_RETRIEVAL / "front" / "build"
    if not (front / "index.html").exists():
        pytest.skip(NOT_FETCHED)
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed and `make test` could not install it (needs apt-get as root)")
    import httpx

    query = "a large red circle on the left on a white background"
    with serving_live(gold_store.root, serve_images=True) as live:
        back, front_port = live.url, live.front_port
        sources, captions = front_in_chromium(front, back, front_port, query, tmp_path)
        # The front shows what /knn-service answers for its body, one figure per URL, the store's copies.
        body = json.dumps(front_body(query, MODEL_VERSION))
        results = httpx.post(f"{back}/knn-service", content=body, timeout=60)
    expected = list(dict.fromkeys(r["url"] for r in results.json()))
    assert sources == expected and all(src.startswith(back + "/api/images/") for src in sources)
    assert len(captions) == len(sources) and captions[0].strip()


def front_in_chromium(front: Path, back: str, front_port: int, query: str, tmp_path: Path) -> tuple[list, list]:
    """clip-retrieval's front served on front_port against `back`, searched for `query` in Chromium:
    (the result images' src, the captions) once the first six have loaded."""
    from playwright.sync_api import sync_playwright

    served = Path(shutil.copytree(front, tmp_path / "front"))
    (served / "config.json").write_text(json.dumps({"defaultBackend": back, "defaultIndex": MODEL_VERSION}))
    handler = functools.partial(synthetic._QuietHandler, directory=str(served))
    front_server = loopback.start(handler, front_port)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(f"http://127.0.0.1:{front_port}/")
            page.wait_for_function(  # the front lists our indices (a cross-origin GET: CORS works)
                "document.querySelector('clip-front')?.indices?.length > 0"
            )
            page.locator("#searchBar").fill(query)
            page.locator("#searchBar").press("Enter")
            pictures = "[...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]"
            page.wait_for_function(f"{pictures}.length > 0")
            page.wait_for_function(f"{pictures}.slice(0, 6).every(i => i.complete && i.naturalWidth > 0)")
            sources = page.eval_on_selector_all("img.pic", "imgs => imgs.map(i => i.getAttribute('src'))")
            captions = page.locator("figcaption").all_inner_texts()
            page.screenshot(path=str(ARTIFACTS / "clip-retrieval-front.png"))
            browser.close()
    finally:
        front_server.shutdown()
        front_server.server_close()
    return sources, captions
