"""An object store that throttles (issue 25): moto behind a proxy (tests/s3_proxy.py) that answers a
share of the requests with S3's 503 SlowDown, a 500, a reset connection or the real answer cut short.
Every count is the proxy's own: what reached the store, not what a client says it tried.

At 5 % the whole pipeline gives what a clean endpoint gives (test_object_store, whose run is
throttled: one run, one test worker); where the retries run out, one clear line
names the object and nothing half-done becomes visible; and a committed object that the store hands
back short or empty is never read as data.
"""

from __future__ import annotations

import re
import time

import pytest
from helpers.s3_proxy import FAULTS, key
from helpers.s3_proxy import verb as verb_of
from helpers.silver import fill
from helpers.stores import cli, copy_in

from rayclip import Searcher
from rayclip.stages import index
from rayclip.store import catalog, debris, layout, storage
from rayclip.store.storage import failures, files

REFERENCE = "clip_rayclip_ref_reference"
ROWS = 200


def test_writes_through_every_client_survive_half_the_puts_failing(s3_proxy, s3_root):
    """s3fs (storage's own writes) and pyarrow's S3 client (what Ray Data writes silver with)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"x": list(range(100))})
    s3_proxy.throttle(0.5, seed=3, methods=("PUT",))
    for i in range(6):
        storage.write_atomic(s3_root / f"s3fs-{i}.bin", bytes([i]) * 1000)
        filesystem, path = storage.arrow(s3_root / f"arrow-{i}.parquet")
        pq.write_table(table, path, filesystem=filesystem)
    assert sum(n for (method, _), n in s3_proxy.spoilt.items() if method == "PUT") >= 3, s3_proxy.spoilt
    s3_proxy.clean()
    for i in range(6):
        assert storage.read_bytes(s3_root / f"s3fs-{i}.bin") == bytes([i]) * 1000
        assert catalog.read_parquet(s3_root / f"arrow-{i}.parquet").equals(table)


# ---------------------------------------------------------------- every fault kind on every verb


def is_list(method: str, path: str) -> bool:
    return verb_of(method, path) == "LIST"


def is_object(method: str, path: str) -> bool:
    return not is_list(method, path)


def object_path(loc) -> str:
    return "/" + loc.path


def bucket_path(loc) -> str:
    return "/" + loc.path.split("/")[0]


VERBS = {  # what rayclip does; the HTTP method, which requests and which path the proxy sees for it
    "GET": (lambda loc: storage.read_bytes(loc), "GET", is_object, object_path),
    "HEAD": (lambda loc: storage.size(loc), "HEAD", is_object, object_path),
    "PUT": (lambda loc: storage.write_atomic(loc, b"y" * 3000), "PUT", is_object, object_path),
    "LIST": (lambda loc: [p.name for p in storage.children(loc.parent)], "GET", is_list, bucket_path),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("verb", VERBS)
def test_each_fault_on_each_verb_costs_one_more_request_and_the_answer_is_the_clean_one(s3_proxy, s3_root, verb, fault):
    """The first request is spoilt and made again: exactly one request more at the proxy than on a
    clean endpoint, and what rayclip gets is what it gets from a clean endpoint."""
    loc = s3_root / "one" / "object.bin"
    storage.write_atomic(loc, b"y" * 3000)
    act, method, match, path = VERBS[verb]

    def counted() -> tuple[object, int]:
        before = s3_proxy.paths[method, path(loc)]
        return act(loc), s3_proxy.paths[method, path(loc)] - before

    clean, clean_requests = counted()
    s3_proxy.throttle(1.0, methods=(method,), match=match, kinds=(fault,), limit=1)
    assert counted() == (clean, clean_requests + 1)
    assert dict(s3_proxy.spoilt) == {(method, fault): 1}
    assert storage.read_bytes(loc) == b"y" * 3000


def write_parquet(loc, rows: int = 20_000):
    import pyarrow as pa

    table = pa.table({"n": list(range(rows))})
    storage.write_atomic(loc, parquet_bytes(table))
    return table


def parquet_bytes(table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_with_arrow(loc):
    import pyarrow.parquet as pq

    filesystem, path = storage.arrow(loc)  # pyarrow's own S3 client, as Ray Data reads with
    return pq.read_table(path, filesystem=filesystem)


@pytest.mark.parametrize(
    "reader",
    [catalog.read_parquet, read_with_arrow, lambda loc: pq_from(storage.read_bytes(loc))],
    ids=["streamed through s3fs", "pyarrow's client", "read whole"],
)
def test_an_answer_cut_short_is_read_again_and_heals(s3_proxy, s3_root, reader):
    loc = s3_root / "cut.parquet"
    table = write_parquet(loc)
    before = s3_proxy.paths["GET", "/" + loc.path]
    s3_proxy.throttle(1.0, methods=("GET",), kinds=("cut",), limit=1)
    assert reader(loc).equals(table)
    assert dict(s3_proxy.spoilt) == {("GET", "cut"): 1}
    reads = s3_proxy.paths["GET", "/" + loc.path] - before
    s3_proxy.clean()
    before = s3_proxy.paths["GET", "/" + loc.path]
    assert reader(loc).equals(table)
    assert reads == s3_proxy.paths["GET", "/" + loc.path] - before + 1  # the cut one, read again


def pq_from(data: bytes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data))


def test_an_answer_cut_every_time_gives_up_in_one_line_that_names_no_4xx(s3_proxy, s3_root, monkeypatch):
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "3")
    monkeypatch.setattr(failures, "CUT_BACKOFF_S", 0.01)
    loc = s3_root / "always-cut.bin"
    storage.write_atomic(loc, b"z" * 10_000)
    s3_proxy.throttle(1.0, methods=("GET",), kinds=("cut",))
    with pytest.raises(storage.StoreError) as refused:
        storage.read_bytes(loc)
    assert s3_proxy.paths["GET", "/" + loc.path] == 3 == s3_proxy.spoilt["GET", "cut"]
    assert re.fullmatch(
        rf"the object store gave up on {re.escape(storage.uri(loc))} after 3 attempts: the answer broke off "
        r"before its end \(Not enough data to satisfy content length header \(received 5000 of 10000 bytes\)\) "
        r"\(\$RAYCLIP_S3_MAX_ATTEMPTS sets the attempts\)",
        str(refused.value),
    ), str(refused.value)


def test_every_fault_on_every_verb_mixed_costs_one_request_each_and_changes_nothing(s3_proxy, s3_root):
    """One request in four of each verb (HEAD, GET, PUT, LIST) spoilt, every kind drawn: the same
    work gives the same results as on a clean endpoint, and each spoilt request cost exactly one more."""

    def work(root) -> tuple[list, int]:
        seen = sum(s3_proxy.seen.values())
        got = []
        for i in range(5):
            loc = root / f"d{i % 3}" / f"f{i}.bin"
            storage.write_atomic(loc, bytes([i]) * (1000 + i))
            got += [storage.exists(loc), storage.size(loc), storage.read_bytes(loc, size=1000 + i)]
        got.append([p.name for d in storage.children(root) for p in storage.children(d)])
        table = write_parquet(root / "t.parquet")
        got += [reader(root / "t.parquet").equals(table) for reader in (catalog.read_parquet, read_with_arrow)]
        return got, sum(s3_proxy.seen.values()) - seen

    clean, clean_requests = work(s3_root / "clean")
    s3_proxy.throttle(0.25, seed=6)
    faulty, faulty_requests = work(s3_root / "faulty")
    spoilt = dict(s3_proxy.spoilt)
    assert faulty == clean
    assert {kind for _, kind in spoilt} == set(FAULTS), spoilt
    assert {verb_of(method, path) for method, path, _ in s3_proxy.log} == set(VERBS)
    assert faulty_requests == clean_requests + sum(spoilt.values()), spoilt


# ---------------------------------------------------------------- when the retries run out


def silver_path(method: str, path: str) -> bool:
    return "/silver/embeddings/" in path and path.split("?")[0].endswith(".parquet")


def test_when_the_store_gives_up_one_line_names_the_object_and_nothing_half_done_shows(
    s3_proxy, s3_root, tmp_path, monkeypatch, capsys
):
    """Every GET of a silver file answered 503 SlowDown, two attempts a request: `rayclip index` fails
    with one line naming the object, the status and the attempts; CURRENT still names the old build,
    no new build is listed; on a clean endpoint the rerun publishes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "2")
    url = storage.uri(s3_root)
    fill(s3_root, ROWS)
    assert cli("index", "--data-dir", url) == 0
    published = catalog.current_build(s3_root, REFERENCE)
    fill(s3_root, 40, prefix="new")

    s3_proxy.throttle(1.0, methods=("GET",), match=silver_path, kinds=("slowdown",))
    capsys.readouterr()
    assert cli("index", "--data-dir", url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(
        rf"rayclip index: error: the object store gave up on {re.escape(url)}/silver/embeddings/\S+\.parquet "
        r"after 2 attempts: 503 SlowDown \(\$RAYCLIP_S3_MAX_ATTEMPTS sets the attempts\)",
        err[0],
    ), err[0]
    assert dict(s3_proxy.spoilt) == {("GET", "slowdown"): 2}  # one request, its two attempts: then it gave up
    assert catalog.current_build(s3_root, REFERENCE) == published
    assert catalog.builds(s3_root, REFERENCE) == [published]
    assert debris.find(s3_root) == []

    s3_proxy.clean()
    assert cli("index", "--data-dir", url) == 0
    rerun = catalog.current_build(s3_root, REFERENCE)
    assert rerun != published and Searcher.open(s3_root).build_info.count == ROWS + 40


def bronze_object(method: str, path: str) -> bool:
    return "/bronze/objects/" in path


def test_a_refusal_inside_a_ray_task_is_one_line_and_exit_1(s3_proxy, s3_root, ingested, ray_session, capfd):
    """The store refuses every bronze read (403, which no retry changes): embed's actors raise it in
    Ray, and the terminal shows one line, no traceback, and the exit status is 1. The next job in
    the same process (a notebook's, a server's) finds every CPU free: the failed run's actor is ended,
    not left to Python's garbage collector."""
    copy_in(ingested, s3_root)
    url = storage.uri(s3_root)
    s3_proxy.throttle(1.0, methods=("GET",), match=bronze_object, kinds=("denied",))
    capfd.readouterr()
    assert cli("embed", "--data-dir", url, "--pretrained", "reference", "--actors", "1", "--batch-size", "8") == 1
    out, err = capfd.readouterr()
    assert s3_proxy.spoilt["GET", "denied"] >= 1
    assert re.fullmatch(
        rf"rayclip embed: error: the object store gave up on {re.escape(url)}/bronze/objects/\S+ after 1 attempt: "
        r"403 AccessDenied \(\$RAYCLIP_S3_MAX_ATTEMPTS sets the attempts\)\n",
        err,
    ), err
    assert "Traceback" not in out + err

    cpus = ray_session.cluster_resources()["CPU"]
    deadline = time.monotonic() + 10  # an actor ends a moment after it is killed
    while ray_session.available_resources().get("CPU") != cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU") == cpus


# ---------------------------------------------------------------- short or empty committed objects


def spoil(loc, how: str) -> int:
    """Cut the object in the store (half of it, or nothing): what a bad disk, a bad copy or a client
    that took a 503 for an empty body leaves. Returns the size it had."""
    data = storage.read_bytes(loc)
    storage.write_atomic(loc, data[: len(data) // 2] if how == "half" else b"")
    return len(data)


@pytest.mark.parametrize(
    "kind, how",
    [
        ("manifest part", "empty"),
        ("silver file", "half"),
        ("index.faiss", "half"),
        ("mapping.parquet", "empty"),
        ("tuning.npz", "half"),
    ],
)
def test_a_committed_object_cut_in_the_store_is_refused_never_read(s3_root, tmp_path, monkeypatch, kind, how):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "VERIFY_ATTEMPTS", 2)
    fill(s3_root, ROWS)
    if kind == "manifest part":
        [part] = catalog.manifest_parts(s3_root)
        size = spoil(part, how)
        read = lambda: catalog.read_manifest(s3_root)  # noqa: E731
        target = part
    elif kind == "silver file":
        [target] = catalog.silver_files(s3_root, REFERENCE)
        size = spoil(target, how)
        read = lambda: index.build(s3_root)  # noqa: E731
    else:
        built = index.build(s3_root)
        target = layout.build_dir(s3_root, REFERENCE, built.build_id) / kind
        size = spoil(target, how)
        if kind == "tuning.npz":  # read by the next build, which extends this one
            fill(s3_root, 20, prefix="more")
            read = lambda: index.build(s3_root)  # noqa: E731
        else:
            read = lambda: Searcher.open(s3_root)  # noqa: E731
    with pytest.raises(storage.StoreError) as refused:
        read()
    message = str(refused.value)
    assert "\n" not in message and target.name in message, message
    assert f"its commit recorded {size} bytes" in message, message


def test_a_committed_object_reported_short_once_is_asked_again_and_used(s3_proxy, s3_root, tmp_path, monkeypatch):
    """The store reports half the manifest part's size once (a HEAD, as a store whose copy is not
    whole yet), then the object: the reader checks the size against the commit's, asks again and
    goes on. Exactly one HEAD more than a clean read reaches the store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ids = fill(s3_root, ROWS)
    [part] = catalog.manifest_parts(s3_root)
    path = ("HEAD", "/" + part.path)

    def heads_of_a_read() -> int:
        before = s3_proxy.paths[path]
        assert sorted(catalog.read_manifest(s3_root).column("media_id").to_pylist()) == sorted(ids)
        return s3_proxy.paths[path] - before

    clean = heads_of_a_read()
    s3_proxy.throttle(1.0, methods=("HEAD",), match=lambda method, p: key(p) == path[1], kinds=("short",), limit=1)
    assert heads_of_a_read() == clean + 1
    assert dict(s3_proxy.spoilt) == {("HEAD", "short"): 1}


@pytest.mark.parametrize("kind", ["build.json", "silver commit record", "CURRENT"])
def test_a_cut_record_is_refused_by_name_never_parsed(s3_root, tmp_path, monkeypatch, kind):
    """The records that say what is committed: an empty or cut one is one line naming it, not a
    traceback and not an empty build id."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fill(s3_root, ROWS)
    built = index.build(s3_root)
    if kind == "build.json":
        target = layout.build_info_file(layout.build_dir(s3_root, REFERENCE, built.build_id))
    elif kind == "silver commit record":
        [target] = storage.glob(layout.silver_commits_dir(s3_root, REFERENCE), "*.json")
    else:
        target = layout.current_file(s3_root, REFERENCE)
    spoil(target, "empty" if kind == "CURRENT" else "half")
    with pytest.raises(storage.ShortReadError) as refused:
        Searcher.open(s3_root) if kind != "silver commit record" else index.build(s3_root, retrain=True)
    message = str(refused.value)
    assert "\n" not in message and target.name in message, message
