"""Operating rayclip: quiet output off a terminal, --json, the Ray dashboard, and the server's
status page, metrics, API key, bind refusal, load shedding and size limits."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import bounded
from helpers.browser import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS
from helpers.ports import free_port
from helpers.serving import held_in_faiss, serving
from helpers.silver import media_ids, normalised, write_silver
from helpers.site import GOOD_IMAGES
from helpers.stores import cli

import rayclip
from rayclip.eval import recall
from rayclip.http.admission import MAX_QUERY_STRING_BYTES
from rayclip.http.app import create_app
from rayclip.http.guard import API_KEY_ENV
from rayclip.query.searcher import Searcher
from rayclip.stages import index
from rayclip.store import layout

KEY = "s3cret-key-for-tests"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"PYTHONPATH": str(Path(rayclip.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")}


def _rayclip(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`rayclip ARGS` in its own process, on its own Ray (RAY_ADDRESS left out); the whole tree is
    killed when `timeout` (below the test's) runs out."""
    cmd = [sys.executable, "-m", "rayclip.cli", *args]
    return bounded.run(cmd, timeout, capture_output=True, text=True, env=_env())


# ------------------------------------------------------------------ progress, logs, --json on the CLI


def test_verbose_brings_img2dataset_back_and_still_writes_the_log(good_metadata, tmp_path, capfd):
    """The quiet side (no library chatter, two progress lines per stage) is test_pipeline's demo test."""
    root = tmp_path / "data"
    assert cli("ingest", "--metadata", str(good_metadata), "--data-dir", str(root), "--timeout", "3", "--verbose") == 0
    out, err = capfd.readouterr()
    assert "Downloading starting" in out + err
    (log,) = layout.ingest_runs_dir(root).glob("*.log")
    assert "Downloading starting" in log.read_text()


def test_json_on_every_command_is_one_document_with_the_run_record_keys(
    ingested, good_metadata, ray_session, tmp_path, capsys
):
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    common = ["--data-dir", str(root), "--json"]

    def run(*args: str):
        rc = cli(*args, *common)
        out = capsys.readouterr().out
        assert rc == 0
        return json.loads(out)  # the whole of stdout is one JSON document

    ingest_doc = run("ingest", "--metadata", str(good_metadata))
    (record,) = [p for p in layout.ingest_runs_dir(root).glob("*.json") if ingest_doc["run_id"] in p.name]
    assert ingest_doc == json.loads(record.read_text())

    embed_doc = run("embed", "--pretrained", "reference", "--actors", "1")
    record = layout.embed_runs_dir(root) / f"{embed_doc['run_id']}.json"
    captions_doc = embed_doc.pop("captions")  # the caption run's record, inside the one document
    assert embed_doc == json.loads(record.read_text()) and embed_doc["images_per_s"] > 0
    record = layout.caption_runs_dir(root) / f"{captions_doc['run_id']}.json"
    assert captions_doc == json.loads(record.read_text()) and captions_doc["pairs_scored"] > GOOD_IMAGES

    index_doc = run("index")
    assert index_doc["count"] == GOOD_IMAGES and index_doc["build_id"]
    status_doc = run("status")
    assert status_doc["gold"][0]["current"] and {r["stage"] for r in status_doc["runs"]} == {"ingest", "embed"}
    search_doc = run("search", "--q", "a red circle", "--k", "3")
    assert [r["rank"] for r in search_doc] == [1, 2, 3]
    eval_doc = run("eval", "--metadata", str(good_metadata), "--pretrained", "reference")
    assert set(eval_doc) >= {"text_to_image", "image_to_text", "chance_text_to_image", "build_id"}


# A command whose run prints to stdout in every way Ray does: Python's print (its notes on workers
# that died, pushed to the driver), descriptor 1 (its C++ core), and at exit (its shut-down).
NOISY_STATUS = """
import atexit, os, sys
from rayclip.cli import parser, run
handler, spec = parser.COMMANDS["status"]
def noisy(args):
    print("(raylet) A worker died or was killed while executing a task")
    os.write(1, b"[core] a line from C++\\n")
    atexit.register(print, "printed while the process exits")
    return handler(args)
parser.COMMANDS["status"] = (noisy, spec)
sys.argv = ["rayclip", "status", "--data-dir", sys.argv[1], "--json"]
run()
"""


def test_json_stdout_holds_the_document_alone_whatever_else_prints_there(tmp_path):
    """In its own process, `--json` keeps stdout for the document: what anything else prints there,
    while the command runs or as the process exits, goes to stderr."""
    cmd = [sys.executable, "-c", NOISY_STATUS, str(tmp_path / "data")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = bounded.run(cmd, 120, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["data_dir"]  # the whole of stdout is one JSON document
    for line in ("(raylet) A worker died", "[core] a line from C++", "printed while the process exits"):
        assert line in done.stderr


# A command run as the process's entry point, with an object that says when modules are torn down.
TORN_DOWN = """
import atexit, sys
from rayclip.cli import run
class Noted:
    def __del__(self):
        sys.stderr.write("modules torn down\\n")
kept = Noted()
atexit.register(sys.stderr.write, "exit handlers ran\\n")
sys.argv = ["rayclip", "search", "--data-dir", sys.argv[1], "--q", "a cat"]
run()
"""


def test_the_command_ends_its_process_after_the_exit_handlers_without_tearing_modules_down(tmp_path):
    """`rayclip` ends as Python's exit would (exit handlers run: Ray's shut-down, logging's flush;
    its exit code kept) but skips tearing every module down, seconds with torch loaded."""
    cmd = [sys.executable, "-c", TORN_DOWN, str(tmp_path / "data")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = bounded.run(cmd, 120, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "error: " in done.stderr  # a user's error: its one line, its code
    assert "exit handlers ran" in done.stderr and "modules torn down" not in done.stderr


def test_json_in_process_keeps_stdout_for_the_document_and_restores_it(tmp_path, capsys, monkeypatch):
    """Called as a library (main() in this process, as the tests and a notebook do), --json moves
    Python's stdout aside while the command runs, and puts it back when it returns."""
    from rayclip.cli import parser

    handler, spec = parser.COMMANDS["status"]
    monkeypatch.setitem(parser.COMMANDS, "status", (lambda args: print("a library's note") or handler(args), spec))
    assert cli("status", "--data-dir", str(tmp_path / "data"), "--json") == 0
    print("after the command")
    out, err = capsys.readouterr()
    assert out.endswith("}\nafter the command\n") and "a library's note" in err
    assert json.loads(out.removesuffix("after the command\n"))["data_dir"]


def test_search_collapse_with_a_threshold_folds_the_pair_that_threshold_joins(tmp_path, capsys):
    """Twenty vectors: a, its near-copy at cosine 0.93, and 18 orthogonal to both. `--collapse 0.9`
    folds the copy into a; without collapse, or at the default (0.96), both come back. (Twenty, not
    four: index.build cannot tune a build of 10 vectors or fewer.)"""
    a, u, *others = np.linalg.qr(np.random.default_rng(11).standard_normal((128, 20)))[0].T  # orthonormal
    near = 0.93 * a + np.sqrt(1 - 0.93**2) * u  # cosine(a, near) == 0.93
    ids = media_ids(20, "collapse-cli")
    root = tmp_path / "data"
    write_silver(root, "2026-01-01", ids, normalised(np.stack([a, near, *others])))
    index.build(root)

    def search(*flags: str) -> list[dict]:
        assert cli("search", "--data-dir", str(root), "--like", ids[0], "--k", "20", "--json", *flags) == 0
        return json.loads(capsys.readouterr().out)

    plain = search()
    assert [r["media_id"] for r in plain[:2]] == ids[:2] and len(plain) == 20
    assert not any(r["duplicates"] for r in plain)
    folded = search("--collapse", "0.9")
    assert len(folded) == 19 and ids[1] not in {r["media_id"] for r in folded}
    assert folded[0]["media_id"] == ids[0] and [r["duplicates"] for r in folded] == [1] + [0] * 18
    default = search("--collapse")  # 0.96: the pair stays apart, so 0.9 above was the threshold used
    assert [r["media_id"] for r in default[:2]] == ids[:2] and len(default) == 20
    assert not any(r["duplicates"] for r in default)


# ------------------------------------------------------------------ the Ray dashboard


def _actor_classes(dashboard: str, token: str) -> set[str]:
    """Actor class names as the dashboard's state API lists them."""
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"{dashboard}/api/v0/actors", params={"limit": 1000}, headers=headers, timeout=5)
    response.raise_for_status()
    return {a.get("class_name", "") for a in response.json()["data"]["result"]["result"]}


@pytest.mark.slow
def test_embed_dashboard_lists_the_embed_actors_while_the_job_runs(ingested, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    cmd = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(root), "--pretrained", "reference"]
    cmd += ["--actors", "1", "--batch-size", "2", "--dashboard", "--json", "--no-captions"]
    # Ray's token authentication guards the dashboard: give the cluster a token this test knows.
    token = secrets.token_hex(32)
    env = _env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr_lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [stderr_lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: set[str] = set()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(queue.Empty):
                match = re.search(r"Ray dashboard: (http://\S+)", stderr_lines.get(timeout=1))
                url = match and match.group(1)
        assert url, "no dashboard URL printed"
        while proc.poll() is None and time.monotonic() < deadline and "MapWorker(MapBatches(EmbedUDF))" not in seen:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                seen |= _actor_classes(url, token)
            time.sleep(0.3)
        stdout = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert "MapWorker(MapBatches(EmbedUDF))" in seen, seen
    assert proc.returncode == 0 and json.loads(stdout)["rows_embedded"] == GOOD_IMAGES


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def evaluated_store(gold_store, tmp_path_factory):
    """The gold store plus an eval.json for its build (what the status page charts)."""
    root = tmp_path_factory.mktemp("evaluated") / "data"
    shutil.copytree(gold_store.root, root)
    recall.save(root, recall.evaluate(Searcher.open(root)))
    return root


def test_api_key_is_required_on_the_api_and_metrics_but_not_on_healthz_and_pages(gold_store):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(gold_store.root, api_key=KEY))
    good = {"Authorization": f"Bearer {KEY}"}
    for path in ("/api/status", "/api/search?q=a+red+circle", "/api/overview", "/metrics"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers=good).status_code == 200, path
    assert client.get("/api/status").headers["www-authenticate"] == "Bearer"
    for path in ("/healthz", "/", "/status", "/static/status.js"):
        assert client.get(path).status_code == 200, path
    media_id = client.get("/api/search?q=a+red+circle&k=1", headers=good).json()["results"][0]["media_id"]
    assert client.get(f"/api/images/{media_id}").status_code == 401
    client.cookies.set("rayclip_api_key", KEY)
    assert client.get(f"/api/images/{media_id}").status_code == 200
    assert client.get("/api/status").status_code == 401  # the cookie opens images only
    # The POST routes too: the combined query and clip-retrieval's routes.
    combined = {"terms": [{"text": "a red circle"}], "k": 1}
    knn = {"text": "a red circle", "modality": "image", "num_images": 1, "indice_name": "clip_rayclip_ref_reference"}
    for path, body in (("/api/search", combined), ("/knn-service", knn)):
        assert client.post(path, json=body).status_code == 401, path
        assert client.post(path, json=body, headers=good).status_code == 200, path
    assert client.get("/indices-list").status_code == 401


@pytest.mark.parametrize("given_by", ["environment", "flag"])
def test_rayclip_serve_takes_the_key_from_the_flag_or_the_environment(vectors_root, given_by):
    port = free_port()
    cmd = [sys.executable, "-m", "rayclip.cli", "serve", "--data-dir", str(vectors_root), "--port", str(port)]
    env = {k: v for k, v in _env().items() if k != API_KEY_ENV}
    if given_by == "environment":
        env[API_KEY_ENV] = KEY
    else:
        cmd += ["--api-key", KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    good = {"Authorization": f"Bearer {KEY}"}
    metadata = {"ids": [0], "indice_name": "clip_rayclip_ref_reference"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/healthz", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            assert http.get("/healthz").status_code == 200  # open: the port is up
            assert http.get("/api/search", params={"q": "a red circle"}).status_code == 401
            wrong = http.get("/api/search", params={"q": "a red circle"}, headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 401
            assert http.get("/api/search", params={"q": "a red circle"}, headers=good).status_code == 200
            assert http.post("/metadata", json=metadata).status_code == 401  # clip-retrieval's routes too
            assert http.post("/metadata", json=metadata, headers=good).status_code == 200
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "API key required on /api/* and /metrics" in output


def test_serving_off_loopback_without_a_key_is_refused_with_one_line(gold_store):
    done = _rayclip("serve", "--data-dir", str(gold_store.root), "--host", "0.0.0.0", "--port", "1", timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--api-key" in done.stderr and "--allow-anonymous" in done.stderr


def test_metrics_are_scraped_in_prometheus_format(gold_store):
    from prometheus_client.parser import text_string_to_metric_families

    with serving(create_app(gold_store.root)) as base:
        for q in ("a red circle", "a blue star", "a green square"):
            assert httpx.get(f"{base}/api/search", params={"q": q}, timeout=30).status_code == 200
        assert httpx.get(f"{base}/api/search", params={"q": ""}, timeout=30).status_code == 422
        scraped = httpx.get(f"{base}/metrics", timeout=30)
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(scraped.text) for s in family.samples]

    def value(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert value("rayclip_requests_total", endpoint="/api/search", status="200") == 3
    assert value("rayclip_requests_total", endpoint="/api/search", status="422") == 1
    for phase in ("encode", "search", "join"):
        assert value("rayclip_query_phase_seconds_count", phase=phase) == 3, phase
    assert value("rayclip_index_vectors") == GOOD_IMAGES
    build_id = gold_store.build.build_id
    assert value("rayclip_build_info", build_id=build_id, model_version=gold_store.build.model_version) == 1
    assert value("rayclip_queries_in_flight") == 0


def test_a_burst_of_four_times_the_queue_depth_is_answered_with_200s_and_503s(gold_store, monkeypatch):
    depth = 2
    slow = Searcher.find  # every query goes through it

    def search_slowly(self, queries, options=None):
        time.sleep(1.0)  # hold the slot long enough for the burst to find the queue full
        return slow(self, queries, options)

    monkeypatch.setattr(Searcher, "find", search_slowly)
    with serving(create_app(gold_store.root, queue_depth=depth)) as base:
        httpx.get(f"{base}/api/search", params={"q": "warm up"}, timeout=60)
        started = time.monotonic()
        with ThreadPoolExecutor(4 * depth) as pool:
            responses = list(
                pool.map(
                    lambda i: httpx.get(f"{base}/api/search", params={"q": f"a red circle {i}"}, timeout=30),
                    range(4 * depth),
                )
            )
        elapsed = time.monotonic() - started
        after = httpx.get(f"{base}/api/search", params={"q": "a red circle"}, timeout=30)
    codes = sorted(r.status_code for r in responses)
    assert len(responses) == 4 * depth and set(codes) == {200, 503}, codes  # every request answered
    assert 1 <= codes.count(200) <= depth + 1
    assert all(
        r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in responses if r.status_code == 503
    )
    assert elapsed < 20  # nothing waited behind the queue: the 503s came at once
    assert after.status_code == 200  # and the slots were given back


def _scrape(http: httpx.Client):
    """/metrics read once: value(name, **labels) sums the samples with those labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return lambda name, **labels: sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_the_queue_depth_plus_one_query_is_shed_and_the_gauge_and_total_phase_count_them(vectors_root, monkeypatch):
    """`depth` queries held inside FAISS fill the queue: the next is a 503 with Retry-After at once,
    the in-flight gauge reads `depth` meanwhile and 0 after, and every answer is a `total` observation."""
    depth = 2
    total = {"name": "rayclip_query_phase_seconds_count", "phase": "total"}
    requests = {"name": "rayclip_requests_total", "endpoint": "/api/search"}
    with (
        held_in_faiss(monkeypatch) as hold,
        serving(create_app(vectors_root, queue_depth=depth)) as base,
        ThreadPoolExecutor(depth) as pool,
    ):
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
            before = _scrape(http)
            try:
                queries = [{"q": f"a red circle {i}"} for i in range(depth)]
                pending = [pool.submit(http.get, "/api/search", params=q) for q in queries]
                assert all(hold.entered.acquire(timeout=30) for _ in range(depth))  # both inside FAISS now
                refused = http.get("/api/search", params={"q": "one too many"}, timeout=10)
                during = _scrape(http)
            finally:
                hold.release.set()
            answered = [f.result(60) for f in pending]
            deadline = time.monotonic() + 10
            while (after := _scrape(http))("rayclip_queries_in_flight") and time.monotonic() < deadline:
                time.sleep(0.05)  # the slot is given back as the response goes out
    assert [r.status_code for r in answered] == [200] * depth
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
    assert during("rayclip_queries_in_flight") == depth
    assert during(**requests, status="503") - before(**requests, status="503") == 1
    assert after("rayclip_queries_in_flight") == 0
    assert after(**requests, status="200") - before(**requests, status="200") == depth
    assert after(**total) - before(**total) == depth + 1  # the 503 is a query answered too


def test_oversized_query_strings_and_bodies_are_refused_before_any_work(gold_store):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(gold_store.root, max_upload_bytes=100_000))
    long_query = client.get("/api/search", params={"q": "x" * (MAX_QUERY_STRING_BYTES + 10)})
    assert long_query.status_code == 414
    huge = client.post("/api/search/image", files={"file": ("x.jpg", b"\0" * 400_000, "image/jpeg")}, params={"k": 1})
    assert huge.status_code == 413 and "request body" in huge.json()["detail"]


def test_a_post_without_content_length_is_refused_411(vectors_root):
    client = TestClient(create_app(vectors_root))

    def chunked(body: bytes):
        yield body  # a generator body: httpx sends it chunked, with no Content-Length

    bodies = {"/api/search": {"terms": [{"text": "a red circle"}]}, "/knn-service": {"text": "a red circle"}}
    for path, body in bodies.items():
        content = chunked(json.dumps(body).encode())
        response = client.post(path, content=content, headers={"Content-Type": "application/json"})
        sent = response.request.headers
        assert sent["transfer-encoding"] == "chunked" and "content-length" not in sent
        assert response.status_code == 411, (path, response.status_code)
        assert response.json()["detail"] == "a request body needs a Content-Length"


# ------------------------------------------------------------------ the status page in Chromium


def test_status_page_in_headless_chromium(evaluated_store):

    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed and `make test` could not install it (needs apt-get as root)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with serving(create_app(evaluated_store, api_key=KEY)) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
        page.goto(base + "/status")
        page.wait_for_selector("#recall svg rect.bar")
        assert len(asked) == 1  # the key is asked for once...
        memory = page.locator(".tile", has_text="server memory")
        memory.wait_for(timeout=30_000)  # drawn from /api/status, after the overview's five tiles
        assert page.locator(".tile").count() == 6 and "file-backed" in memory.inner_text()
        assert page.locator("#builds tr.current .badge.current").inner_text() == "CURRENT"
        assert page.locator("#silver tbody tr").count() >= 1
        stages = page.locator("#runs tbody tr td:first-child").all_inner_texts()
        assert sorted(set(stages)) == ["embed", "ingest"]
        assert page.locator("#runs .chip").count() >= 1  # the ingest's failures, by reason
        # Three series (text→image, image→text, chance) for each of the three K.
        assert page.locator("#recall rect.bar").count() == 9
        assert page.locator("#recall rect.t2i").count() == 3 and page.locator("#recall rect.chance").count() == 3
        assert not page.locator("#message.error").count()
        page.screenshot(path=str(ARTIFACTS / "status.png"), full_page=True)

        page.goto(base + "/?q=a+red+circle")  # ...and kept: the search page needs no second prompt
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].slice(0, 3).every(i => i.complete && i.naturalWidth > 0)"
        )
        assert len(asked) == 1
        browser.close()
