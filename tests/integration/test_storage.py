"""The storage primitives behave the same on a local folder, moto's S3 and fsspec's memory store."""

from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclip.errors import UserError
from rayclip.store import storage
from rayclip.store.storage import files, leases


@pytest.fixture(params=["local", "s3", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.data_root(tmp_path / "data")
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return storage.data_root(f"s3://rayclip-test/{uuid.uuid4().hex[:12]}")
    return storage.data_root(f"memory://rayclip/{uuid.uuid4().hex[:12]}")


def test_data_root_reads_urls_and_paths(tmp_path, monkeypatch):
    assert storage.is_local(storage.data_root(tmp_path)) and storage.data_root(tmp_path) == tmp_path
    assert storage.data_root(f"file://{tmp_path}") == tmp_path
    assert storage.uri(storage.data_root("s3://bucket/prefix/")) == "s3://bucket/prefix"
    monkeypatch.setenv(storage.DATA_DIR_ENV, "s3://bucket/from-env")
    assert storage.uri(storage.data_root()) == "s3://bucket/from-env"


def test_write_read_list_delete(root):
    storage.write_atomic(root / "a" / "one.json", '{"x": 1}')
    storage.write_json_atomic(root / "a" / "two.json", {"y": 2})
    storage.write_atomic(root / "b" / "c" / "three.bin", b"\x00\x01")
    assert storage.read_json(root / "a" / "one.json") == {"x": 1}
    assert storage.read_json(root / "a" / "two.json") == {"y": 2}
    assert storage.read_bytes(root / "b" / "c" / "three.bin") == b"\x00\x01"
    assert [p.name for p in storage.glob(root / "a", "*.json")] == ["one.json", "two.json"]
    assert [p.name for p in storage.glob(root, "*/*/*.bin")] == ["three.bin"]
    assert storage.glob(root / "missing", "*") == []
    assert storage.is_dir(root / "b") and not storage.is_dir(root / "a" / "one.json")
    assert storage.tree_size(root / "b") == 2
    assert abs(storage.mtime(root / "a" / "one.json") - time.time()) < 120
    storage.delete(root / "b")
    storage.delete(root / "a" / "one.json")
    storage.delete(root / "never-there")
    assert not storage.exists(root / "b" / "c" / "three.bin") and not storage.exists(root / "a" / "one.json")
    assert storage.exists(root / "a" / "two.json")


TREE = ["a/one.json", "a/.hidden.tmp", "a/x/two.json", "b/c/three.bin", "b/c/d/.deep.tmp", "ab.json", "7.tar", "-.tar"]
PATTERNS = [
    "*",
    "*.json",
    "*/*.json",
    "*/*/*.bin",
    "**/*",
    "b/**/.*.tmp",
    "**/*.json",
    "[ab]/*",
    "[!a]*",
    "[0-9].tar",
    "[!a-c]*",
    "?/x",
    "missing/*",
]


def globbed(base, pattern: str) -> list[str]:
    """storage.glob's finds, as names relative to `base`."""
    return [str(p)[len(str(base)) + 1 :] for p in storage.glob(base, pattern)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_glob_finds_on_every_store_what_it_finds_locally(root, tmp_path, pattern):
    local = tmp_path / "tree"
    for name in TREE:
        storage.write_atomic(root / name, name)
        storage.write_atomic(local / name, name)
    assert globbed(root, pattern) == globbed(local, pattern)


def test_a_glob_on_s3_is_one_listing_request_of_the_folders_it_names(s3_proxy, s3_root, monkeypatch):
    """fsspec's own glob asked about the prefix first (a HEAD and a LIST) and listed a folder at a time:
    6 requests for a folder's children, 7 for two levels of a tree. A folder the pattern names
    outright is where the listing starts: never the whole store for one folder's files."""
    root = s3_root
    for name in TREE:
        storage.write_atomic(root / name, name)
    listed = []
    for method in ("ls", "find"):
        real = getattr(root.fs, method)
        monkeypatch.setattr(
            root.fs,
            method,
            lambda path, *a, m=method, real=real, **kw: listed.append((m, path)) or real(path, *a, **kw),
        )
    asked = [("*", 5, "ls", ""), ("*/*.json", 1, "find", ""), ("**/*", 13, "find", ""), ("b/c/.*.tmp", 0, "ls", "/b/c")]
    for pattern, found, method, prefix in asked:
        seen, listed[:] = dict(s3_proxy.seen), []
        assert len(storage.glob(root, pattern)) == found
        assert {k: v - seen.get(k, 0) for k, v in s3_proxy.seen.items() if v != seen.get(k, 0)} == {"GET": 1}
        assert listed == [(method, root.path + prefix)]


def test_a_folder_marker_on_s3_is_the_folder_it_names_listed_once(s3_root):
    """A key ending in "/" (what the S3 console's "create folder" and Hadoop's s3a write) is no name of
    its own: a glob lists its folder once, as a local glob would."""
    root = s3_root
    for name in TREE:
        storage.write_atomic(root / name, name)
    for marker in ("b/", "b/c/", "e/"):
        root.fs.pipe(f"{root.path}/{marker}", b"")
    assert globbed(root, "*") == ["-.tar", "7.tar", "a", "ab.json", "b", "e"]
    assert globbed(root, "*/*") == ["a/.hidden.tmp", "a/one.json", "a/x", "b/c"]


@pytest.mark.parametrize("pattern", ["**", "a/", "a/**"])
def test_a_glob_on_an_object_store_that_ends_in_no_name_is_one_clear_line(s3_root, pattern):
    """pathlib's glob gives folders for these; an object-store glob refuses them (no caller asks)."""
    with pytest.raises(UserError, match="must end in a name"):
        storage.glob(s3_root, pattern)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_bytes(root):
    target = root / "part.parquet"
    with pytest.raises(RuntimeError):
        with storage.open_output(target) as f:
            f.write(b"half of it")
            raise RuntimeError("writer died")
    assert not storage.exists(target)
    storage.write_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_output(target) as f:
            f.write(b"new, unfinished")
            raise RuntimeError("writer died")
    assert storage.read_bytes(target) == b"old"
    assert [p.name for p in storage.glob(root, "*")] == ["part.parquet"]  # no temporary left


def test_parquet_round_trip_through_open_output_and_arrow(root):
    table = pa.table({"media_id": ["a", "b"], "n": [1, 2]})
    with storage.open_output(root / "t" / "x.parquet") as f:
        pq.write_table(table, f)
    fs, path = storage.arrow(root / "t" / "x.parquet")
    assert pq.read_table(path, filesystem=fs).equals(table)
    with storage.open_input(root / "t" / "x.parquet") as f:
        assert pq.read_table(f).equals(table)


def test_put_if_absent_stores_once(root):
    key = root / "objects" / "ab" / "abcd.jpg"
    assert storage.put_if_absent(key, b"bytes") is True
    assert storage.put_if_absent(key, b"bytes") is False
    assert storage.read_bytes(key) == b"bytes"


def test_a_work_folder_is_held_while_its_run_lives(root, monkeypatch):
    folder = root / "work" / "run-1"
    with storage.working(folder):
        storage.write_atomic(folder / "staged.bin", b"x")
        with storage.unless_held(folder) as free:
            assert not free
    assert not storage.exists(folder / "staged.bin")  # a finished run removes its work folder
    if storage.is_local(root):
        return  # a local lock dies with its process: tests/test_faults.py kills one
    # On an object store a dead run's lease stops being rewritten and goes stale.
    storage.write_atomic(folder / storage.LEASE_NAME, str(time.time()))
    with storage.unless_held(folder) as free:
        assert not free
    monkeypatch.setattr(leases, "LEASE_STALE_S", -1.0)
    with storage.unless_held(folder) as free:
        assert free


def test_open_append_takes_writes_through_its_descriptor_and_move_renames(root):
    log = root / "runs" / "provisional.log"
    with storage.open_append(log) as f:
        os.write(f.fileno(), b"from a descriptor\n")  # as a library's fd 1 and 2 write it
    with storage.open_append(log) as f:
        f.write(b"second stage\n")
    assert storage.read_bytes(log) == b"from a descriptor\nsecond stage\n"
    storage.move(log, root / "runs" / "run-1.log")
    assert not storage.exists(log) and storage.read_text(root / "runs" / "run-1.log").startswith("from a")


def test_a_kept_work_folder_stays_on_success_and_goes_on_failure(root):
    done, failed = root / "builds" / "b1", root / "builds" / "b2"
    with storage.working(done, keep=True):
        storage.write_atomic(done / "build.json", b"{}")
    assert [p.name for p in storage.children(done)] == ["build.json"]  # kept, and no lease left in it
    with pytest.raises(RuntimeError):
        with storage.working(failed, keep=True):
            storage.write_atomic(failed / "index.faiss", b"half")
            raise RuntimeError("build died")
    assert not storage.exists(failed / "index.faiss")


def test_cached_downloads_a_remote_object_once_and_reads_a_local_file_in_place(root, tmp_path, monkeypatch):
    source, copy = root / "gold" / "index.faiss", tmp_path / "cache" / "index.faiss"
    storage.write_atomic(source, b"x" * (storage.CHUNK_BYTES + 5))
    if storage.is_local(root):
        assert storage.cached(source, copy) == source and not copy.exists()
        return
    assert storage.cached(source, copy) == copy and copy.read_bytes() == storage.read_bytes(source)
    monkeypatch.setattr(files, "open_input", lambda loc: pytest.fail(f"read {loc} again"))
    assert storage.cached(source, copy) == copy


def test_a_long_run_keeps_its_folder_held(root, monkeypatch):
    """However long a run lives, its folder stays held: locally by a flock, which does not age (no
    lease, so no stale time applies); on an object store by a lease its heartbeat keeps young."""
    folder = root / "work" / "run-long"
    if storage.is_local(root):
        monkeypatch.setattr(leases, "LEASE_STALE_S", -1.0)  # any lease would be stale at once
        with storage.working(folder):
            with storage.unless_held(folder) as free:
                assert not free
            assert not storage.exists(folder / storage.LEASE_NAME)
        return
    monkeypatch.setattr(leases, "LEASE_BEAT_S", 0.5)
    monkeypatch.setattr(leases, "LEASE_STALE_S", 3.0)  # S3 times its objects to the second
    with storage.working(folder):
        time.sleep(4.0)  # longer than the stale time: only the heartbeat keeps the lease young
        with storage.unless_held(folder) as free:
            assert not free


# ---------------------------------------------------------------- retries, and what rayclip gives Ray


def s3fs_read(loc) -> bytes:
    return storage.read_bytes(loc)


def shipped_arrow_read(loc) -> bytes:
    """pyarrow's client as Ray Data ships it to its read tasks: pickled, then read through."""
    import pickle

    filesystem, path = storage.arrow(loc)
    with pickle.loads(pickle.dumps(filesystem)).open_input_stream(path) as f:
        return f.read()


@pytest.mark.parametrize("read", [s3fs_read, shipped_arrow_read], ids=["s3fs", "pyarrow shipped"])
def test_every_s3_client_makes_as_many_attempts_as_the_one_knob_says(s3_proxy, monkeypatch, read):
    """Counted at the proxy, against the clients' own default of 3 attempts: with
    $RAYCLIP_S3_MAX_ATTEMPTS=4 a GET answered 500 three times succeeds on its fourth request; with 2,
    one answered 500 every time is given up after exactly two. (Not 4 for both: pyarrow's client
    waits up to 1, 2, 4 … s before each retry, and its waits cannot be shortened here.)"""
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "4")
    root = storage.data_root(f"s3://rayclip-test/{uuid.uuid4().hex[:12]}")
    loc = root / "knob.bin"
    storage.write_atomic(loc, b"k" * 1000)
    path = ("GET", "/" + loc.path)

    s3_proxy.throttle(1.0, methods=("GET",), kinds=("internal",), limit=3)
    before = s3_proxy.paths[path]
    assert read(loc) == b"k" * 1000
    assert s3_proxy.paths[path] - before == 4 and s3_proxy.spoilt["GET", "internal"] == 3

    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "2")
    loc = storage.data_root(storage.uri(root)) / "knob.bin"  # opened again: a root reads the knob when opened
    s3_proxy.throttle(1.0, methods=("GET",), kinds=("internal",))
    before = s3_proxy.paths[path]
    with pytest.raises((storage.StoreError, OSError)):
        read(loc)
    assert s3_proxy.paths[path] - before == 2


def test_the_knob_and_the_retry_mode_reach_other_processes(monkeypatch):
    """What rayclip hands img2dataset's and Ray's processes (their own S3 clients read AWS_*)."""
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert storage.retry_env() == {
        storage.S3_MAX_ATTEMPTS_ENV: "3",
        "AWS_MAX_ATTEMPTS": "3",
        "AWS_RETRY_MODE": "adaptive",
    }
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "none")
    with pytest.raises(UserError, match="RAYCLIP_S3_MAX_ATTEMPTS"):
        storage.data_root("s3://bucket/again")


@pytest.fixture
def fresh_env(monkeypatch):
    """The variables rayclip sets for Ray and img2dataset, unset now and restored after."""
    for name in ("RAY_USAGE_STATS_ENABLED", "NO_ALBUMENTATIONS_UPDATE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


def test_a_command_joins_a_cluster_on_loopback_there(ray_session):
    """$RAY_ADDRESS naming a cluster that listens on loopback only (the session's) is joined there:
    the process's node address and the cluster's address stay loopback. (cluster.start's own cluster
    on loopback: test_embed_startup.py's warm-up test, which starts one anyway.)"""
    import sys

    from helpers import bounded

    from rayclip.cluster import LOOPBACK

    address = ray_session.get_runtime_context().gcs_address
    assert address.startswith(f"{LOOPBACK}:")
    code = "import ray; from rayclip import cluster; cluster.start(); c = ray.get_runtime_context()"
    code += "; print(c.gcs_address, ray.util.get_node_ip_address()); ray.shutdown()"
    env = os.environ | {"RAY_ADDRESS": address}
    done = bounded.run([sys.executable, "-c", code], 120, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    gcs, node = done.stdout.split()
    assert gcs == address and node == LOOPBACK


def test_the_ray_rayclip_starts_has_usage_stats_off_and_the_retries(fresh_env, monkeypatch):
    """Every start of Ray (cluster.start for embed/eval/demo/index, ingest's for its ray distributor)
    goes through cluster.start: RAY_USAGE_STATS_ENABLED=0 in this process (ray.init reads
    it) and in the job's runtime_env with the S3 retries (the workers of a joined cluster)."""
    import ray

    from rayclip import cluster
    from rayclip.stages.ingest import download

    started: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr("ray._private.worker.get_dashboard_url", lambda: None)
    cluster.start()
    assert download._workers("ray", 1) == 2
    for kwargs in started:
        env = kwargs["runtime_env"]["env_vars"]
        assert (
            env["RAY_USAGE_STATS_ENABLED"] == "0" and env["AWS_MAX_ATTEMPTS"] == env["RAYCLIP_S3_MAX_ATTEMPTS"] == "10"
        )
    assert started[1]["runtime_env"]["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    # img2dataset (albumentations) is imported in this process too: the variables are set here first.
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1" and os.environ["AWS_MAX_ATTEMPTS"] == "10"

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's choice wins
    cluster.start()
    assert started[-1]["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "1"
