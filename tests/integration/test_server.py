"""The HTTP service: API behaviour and status codes (TestClient), and the page in headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from helpers.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from helpers.ports import free_port
from helpers.serving import serving
from helpers.site import GOOD_IMAGES
from helpers.stores import a_media

from rayclip.http.app import create_app
from rayclip.options import DEFAULT_COLLAPSE, SearchOptions
from rayclip.stages import index
from rayclip.store import catalog


@pytest.fixture(scope="module")
def server_client(gold_store):
    """The app on the gold store, its upload limit at 200 kB."""
    return TestClient(create_app(gold_store.root, max_upload_bytes=200_000))


def test_text_search_returns_the_cli_result_objects(server_client):
    body = server_client.get("/api/search", params={"q": "a large red circle", "k": 5}).json()
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert set(body["results"][0]) == {"rank", "score", "media_id", "path", "url", "caption", "duplicates", "faiss_id"}
    assert body["model_version"] == "clip_rayclip_ref_reference" and body["build_id"]


def test_image_upload_and_similar_find_the_image_first(server_client, gold_store):
    row = a_media(gold_store.root)
    data = (gold_store.root / row["path"]).read_bytes()
    upload = server_client.post(
        "/api/search/image", params={"k": 3}, files={"file": ("q.jpg", data, "image/jpeg")}
    ).json()
    assert upload["results"][0]["media_id"] == row["media_id"]
    similar = server_client.get("/api/search/similar", params={"media_id": row["media_id"], "k": 3}).json()
    assert similar["results"][0]["media_id"] == row["media_id"] and similar["results"][0]["score"] > 0.999


def test_images_are_served_from_the_store_only(server_client, gold_store):
    row = a_media(gold_store.root)
    response = server_client.get(f"/api/images/{row['media_id']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (gold_store.root / row["path"]).read_bytes()
    # Named by the hash of its bytes, it never changes: cached for a year, by the browser only.
    assert response.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert server_client.get("/api/images/" + "0" * 64).status_code == 404  # well-formed, not stored
    # Malformed ids are refused by the media_id check (422) before a path or glob is built from them:
    # without it, "*" or a prefix plus "*" would glob their way to some stored object.
    escapes = ["...", "%2E%2E", "..%5C..%5Cwin", "*", "%2A" * 64, row["media_id"][:63] + "*", row["media_id"][:2] + "*"]
    for bad in ["abc", "G" * 64, row["media_id"].upper(), row["media_id"] + "0", *escapes]:
        response = server_client.get(f"/api/images/{bad}")
        assert response.status_code == 422, (bad, response.status_code)
        assert "64 lowercase hex" in response.json()["detail"]
    # An encoded slash makes another path, which no route serves.
    for other_path in ["..%2F..%2Fetc%2Fpasswd", row["media_id"][:2] + "%2F" + row["media_id"]]:
        assert server_client.get(f"/api/images/{other_path}").status_code == 404


@pytest.mark.parametrize(
    "params, status",
    [
        ({"q": ""}, 422),
        ({"q": "   "}, 422),
        ({"q": "x" * 1001}, 422),
        ({"q": "cat", "k": 0}, 422),
        ({"q": "cat", "k": 10_000}, 422),
        ({}, 422),
    ],
)
def test_bad_text_queries(server_client, params, status):
    response = server_client.get("/api/search", params=params)
    assert response.status_code == status and response.json()["detail"]


def test_bad_uploads(server_client):
    assert (
        server_client.post("/api/search/image", files={"file": ("x.jpg", b"<html>", "image/jpeg")}).status_code == 415
    )
    assert (
        server_client.post("/api/search/image", files={"file": ("x.jpg", b"\0" * 300_000, "image/jpeg")}).status_code
        == 413
    )


def test_status_health_docs(server_client):
    assert server_client.get("/healthz").json() == {"ok": True}
    assert server_client.get("/api/status").json()["count"] == GOOD_IMAGES
    assert server_client.get("/docs").status_code == 200
    assert "/api/search" in server_client.get("/openapi.json").json()["paths"]


def test_no_index_is_503_then_a_new_build_is_picked_up_without_restart(gold_store, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root, ignore=shutil.ignore_patterns("gold"))
    fresh = TestClient(create_app(root))
    response = fresh.get("/api/search", params={"q": "a red circle"})
    assert response.status_code == 503 and "rayclip index" in response.json()["detail"]
    first = index.build(root)
    assert fresh.get("/api/status").json()["build_id"] == first.build_id
    second = index.build(root)
    assert fresh.get("/api/status").json()["build_id"] == second.build_id


@dataclass(frozen=True)
class PageStore:
    root: Path
    original: str  # the media_id of an image of the gold store
    copy: str  # the media_id of its near-duplicate vector, which has no image


@pytest.fixture
def page_store(gold_store, tmp_path) -> PageStore:
    """The gold store plus a near-duplicate (cosine ~0.99) of its first image's vector, under a
    media_id of its own with no image."""
    import numpy as np
    from helpers.silver import media_ids, write_silver
    from helpers.stores import read_silver

    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    original, copy = a_media(root)["media_id"], media_ids(1, "near-duplicate")[0]
    silver = read_silver(root, gold_store.build.model_version)
    vector = np.asarray(silver.column("embedding")[silver.column("media_id").to_pylist().index(original)].as_py())
    noise = np.random.default_rng(5).standard_normal(len(vector)) * 0.01
    write_silver(root, "2030-01-01", [copy], (vector + noise)[None])
    index.build(root)
    return PageStore(root, original, copy)


@pytest.fixture
def live_server(page_store):
    with serving(create_app(page_store.root)) as base:
        yield base


def test_search_page_in_headless_chromium(live_server, page_store):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed and `make test` could not install it (needs apt-get as root)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        searches = []  # the query strings of the page's search requests, in order
        page.on("request", lambda r: "/api/search" in r.url and searches.append(parse_qs(urlsplit(r.url).query)))
        page.goto(live_server + "/")
        assert page.is_checked("#collapse") and page.input_value("#where") == ""  # hiding duplicates: on by default
        page.fill("#q", "a large red circle on the left on a white background")
        page.click("button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#results img').length > 0")
        first = {"q": [page.input_value("#q")], "k": [str(SearchOptions.k)], "collapse": [str(DEFAULT_COLLAPSE)]}
        assert searches == [first]  # the server's defaults (/api/defaults), not the page's own
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].slice(0, 6).every(i => i.complete && i.naturalWidth > 0)"
        )
        assert "q=a+large+red+circle" in page.url
        captions = page.locator("#results .caption").all_inner_texts()
        assert len(captions) == min(SearchOptions.k, GOOD_IMAGES)
        page.screenshot(path=str(ARTIFACTS / "search-text.png"))

        page.locator("#results .card").nth(2).click()
        page.wait_for_url("**like=*")
        clicked = page.url.split("like=")[1].split("&")[0]
        page.wait_for_function(f"document.querySelector('#results .card')?.dataset.mediaId === '{clicked}'")
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].slice(0, 6).every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=str(ARTIFACTS / "search-similar.png"))

        # A shared URL reproduces the page.
        page.goto(live_server + "/?q=a+small+blue+star")
        page.wait_for_function("document.querySelectorAll('#results .card').length > 0")
        assert page.input_value("#q") == "a small blue star"
        assert searches[-1]["collapse"] == [str(DEFAULT_COLLAPSE)]

        # Near-duplicates are folded into the result they resemble, and say so.
        root, original, copy = page_store.root, page_store.original, page_store.copy
        page.goto(live_server + f"/?like={original}")
        page.wait_for_function(f"document.querySelector('#results .card')?.dataset.mediaId === '{original}'")
        assert searches[-1]["collapse"] == [str(DEFAULT_COLLAPSE)]
        assert page.locator("#results .duplicates").all_inner_texts() == ["+1 near-duplicate hidden"]
        assert page.locator("#results .card").first.locator(".duplicates").count() == 1
        assert page.locator(f"#results .card[data-media-id='{copy}']").count() == 0
        # Unchecking the toggle searches again without collapse: the copy comes back, second.
        with page.expect_request(lambda r: "/api/search/" in r.url) as unfolded:
            page.uncheck("#collapse")
        assert "collapse" not in parse_qs(urlsplit(unfolded.value.url).query) and "collapse=off" in page.url
        page.wait_for_function(f"document.querySelectorAll('#results .card')[1]?.dataset.mediaId === '{copy}'")
        assert page.locator("#results .duplicates").count() == 0
        # The filter box adds where= to the next search.
        page.fill("#q", "a small blue star")
        page.fill("#where", "caption LIKE '%red%'")
        with page.expect_request(lambda r: "/api/search?" in r.url) as filtered:
            page.click("button[type=submit]")
        sent = parse_qs(urlsplit(filtered.value.url).query)
        assert sent["where"] == ["caption LIKE '%red%'"] and "collapse" not in sent
        red = sum("red" in (r["caption"] or "") for r in catalog.read_manifest(root).to_pylist())
        assert 0 < red < GOOD_IMAGES
        page.wait_for_function(f"document.querySelectorAll('#results .card').length === {red}")
        assert all(" red " in c for c in page.locator("#results .caption").all_inner_texts())
        # The filter and the toggle travel in the URL: a reload searches the same way.
        with page.expect_request(lambda r: "/api/search?" in r.url) as reloaded:
            page.reload()
        assert parse_qs(urlsplit(reloaded.value.url).query) == sent
        assert not page.is_checked("#collapse") and page.input_value("#where") == "caption LIKE '%red%'"
        browser.close()


def test_rayclip_serve_command_listens_on_loopback_and_says_where(gold_store):
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "rayclip.cli", "serve", "--data-dir", str(gold_store.root), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not listening_sockets(proc.pid):
            time.sleep(0.2)
        # The socket the process really bound (read from the kernel), not the address it printed.
        assert listening_sockets(proc.pid) == [("127.0.0.1", port)]
        assert httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=30).json()["count"] == GOOD_IMAGES
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/" in output


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets a process listens on, from /proc (Linux)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir() if fd_dir.exists() else []:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in [("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)]:
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found
