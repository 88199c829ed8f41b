"""What docs/search-and-serving.md promises of the service, each proven on a real server:

- every query route is admitted through the queue (a full queue answers 503 + Retry-After at once);
- an object store that gives up is a 503 whose detail is its one line;
- `--allow-anonymous` and check_bind's rules decide who may serve anonymously off loopback.
"""

from __future__ import annotations

import io
import re
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.serving import held_in_faiss, serving
from helpers.stores import cli, copy_in

from rayclip.errors import UserError
from rayclip.http.app import create_app
from rayclip.http.guard import API_KEY_ENV, check_bind
from rayclip.store import catalog, layout, storage

REFERENCE = "clip_rayclip_ref_reference"
KNN = {"text": "a red circle", "modality": "image", "num_images": 1, "indice_name": "clip_rayclip_ref_reference"}


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


ROUTES = {  # every route that encodes or searches: (method, path, what the request carries)
    "GET /api/search": lambda http, media_id: http.get("/api/search", params={"q": "a red circle"}),
    "POST /api/search": lambda http, media_id: http.post("/api/search", json={"terms": [{"text": "a red circle"}]}),
    "GET /api/search/similar": lambda http, media_id: http.get("/api/search/similar", params={"media_id": media_id}),
    "POST /api/search/image": lambda http, media_id: http.post(
        "/api/search/image", files={"file": ("red.png", png(), "image/png")}
    ),
    "POST /knn-service": lambda http, media_id: http.post("/knn-service", json=KNN),
}


def first_media_id(root) -> str:
    [silver] = catalog.silver_files(root, REFERENCE)
    return catalog.read_parquet(silver).column("media_id")[0].as_py()


@pytest.mark.parametrize("route", ROUTES)
def test_every_query_route_is_shed_when_the_queue_is_full(vectors_root, monkeypatch, route):
    """Queue depth 1, held by a text query inside FAISS: the route answers 503 with Retry-After at
    once (a route without admission would wait behind FAISS and time out); released, it answers 200."""
    media_id = first_media_id(vectors_root)
    with serving(create_app(vectors_root, queue_depth=1)) as base:
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
            assert ROUTES[route](http, media_id).status_code == 200  # warm: the route works
            with held_in_faiss(monkeypatch) as hold:
                occupant = threading.Thread(target=http.get, args=("/api/search",), kwargs={"params": {"q": "hold"}})
                occupant.start()
                try:
                    assert hold.entered.acquire(timeout=30)  # the one slot is taken, inside FAISS
                    with httpx.Client(base_url=base, timeout=5, trust_env=False) as other:
                        refused = ROUTES[route](other, media_id)
                finally:
                    hold.release.set()
                    occupant.join(timeout=30)
            after = ROUTES[route](http, media_id)
    assert refused.status_code == 503, (refused.status_code, refused.text)
    assert refused.headers["retry-after"] == "1" and refused.json()["detail"].startswith("busy:")
    assert after.status_code == 200


# ---------------------------------------------------------------- the store gives up


@pytest.mark.parametrize("when", ["from the start", "after the start"])
def test_a_store_that_gives_up_is_a_503_whose_detail_is_its_one_line(
    vectors_root,
    s3_proxy,
    s3_root,
    tmp_path,
    monkeypatch,
    when,
):
    """Every GET under the data root answered 503 SlowDown, two attempts a request: a search and an
    image answer 503 with the store's one line; when the store answers again, so does the service
    (no restart)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "2")
    copy_in(vectors_root, s3_root)
    media_id = first_media_id(vectors_root)
    storage.write_atomic(layout.objects_dir(s3_root) / media_id[:2] / f"{media_id}.png", png())
    url = storage.uri(s3_root)
    refuse = lambda: s3_proxy.throttle(1.0, methods=("GET", "HEAD"), kinds=("slowdown",))  # noqa: E731
    if when == "from the start":
        refuse()
    with TestClient(create_app(url)) as client:
        if when == "after the start":
            refuse()
        searched = client.get("/api/search", params={"q": "a red circle"})
        image = client.get(f"/api/images/{media_id}")
        s3_proxy.clean()
        again = client.get("/api/search", params={"q": "a red circle"}), client.get(f"/api/images/{media_id}")
    one_line = (
        rf"the object store gave up on {re.escape(url)}/\S+ after 2 attempts: 503( SlowDown)? "
        r"\(\$RAYCLIP_S3_MAX_ATTEMPTS sets the attempts\)"  # a HEAD's 503 has no body, so no code
    )
    for answer in (searched, image):
        assert answer.status_code == 503, (answer.status_code, answer.text)
        assert re.fullmatch(one_line, answer.json()["detail"]), answer.json()
    assert [a.status_code for a in again] == [200, 200]
    assert again[1].content == png()


# ---------------------------------------------------------------- who may serve anonymously


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_is_served_anonymously(host):
    check_bind(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "rayclip.internal"])
def test_anything_else_needs_a_key_or_allow_anonymous(host):
    with pytest.raises(UserError, match="--api-key .* or --allow-anonymous") as refused:
        check_bind(host, None, False)
    assert "\n" not in str(refused.value) and host in str(refused.value)
    check_bind(host, "a key", False)
    check_bind(host, None, True)


@pytest.mark.parametrize("allow", [True, False])
def test_serve_passes_allow_anonymous_to_the_bind_rule(vectors_root, monkeypatch, capsys, allow):
    """`rayclip serve --host 0.0.0.0`: with --allow-anonymous uvicorn is started on that host (spied,
    nothing listens); without it, one line and exit 2, and uvicorn never starts."""
    import uvicorn

    started = []
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((host, port)))
    flags = ["--allow-anonymous"] if allow else []
    code = cli("serve", "--data-dir", str(vectors_root), "--host", "0.0.0.0", "--port", "8765", *flags)
    err = capsys.readouterr().err
    if allow:
        assert (code, started, err) == (0, [("0.0.0.0", 8765)], "")
    else:
        assert code == 2 and started == [] and err.count("\n") == 1 and "--allow-anonymous" in err
