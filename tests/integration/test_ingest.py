"""Ingest through real img2dataset against a loopback server, and folder ingest."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import bounded, loopback
from helpers.site import GOOD_IMAGES
from helpers.stores import cli, run_ingest

from rayclip import synthetic
from rayclip.stages import ingest
from rayclip.stages.ingest import admit, download
from rayclip.store import catalog, layout, storage


def manifest(root: Path) -> list[dict]:
    return catalog.read_manifest(root).to_pylist()


def check_store_invariants(root: Path) -> None:
    """Every manifest row points at an object whose sha256 is its media_id; no partial files."""
    for row in manifest(root):
        data = (root / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["media_id"]
        assert row["path"] == layout.object_relpath(row["media_id"], row["format"])
    for obj in layout.objects_dir(root).glob("*/*"):
        assert not obj.name.startswith("."), f"temporary file left behind: {obj}"
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.stem


def test_metadata_ingest_counts_every_reason_and_stores_by_content(store, metadata, site):
    """conftest's `ingested` ran run_ingest(root, metadata) once; `store` is a copy of that root."""
    root = store
    [(_, _, report)] = catalog.run_records(root)  # the run's record: the report, as saved

    assert report["rows_read"] == GOOD_IMAGES + 10
    assert report["stored"] == GOOD_IMAGES  # dup.jpg and slow.jpg carry the first image's bytes
    assert report["admitted"] == GOOD_IMAGES + 1  # dup.jpg arrives; slow.jpg times out
    assert report["duplicates"] == 1
    assert dict(sorted(report["failed"].items())) == {
        "HTTP 404": 1,
        "decode error": 2,
        "empty body": 1,
        "image too large to decode": 1,
        "missing url": 2,
        "timeout": 1,
        "unsupported url scheme": 1,
    }
    rows = manifest(root)
    assert len(rows) == GOOD_IMAGES + 1
    assert len({r["media_id"] for r in rows}) == GOOD_IMAGES
    # The same bytes from two URLs: one object, both (url, caption) rows.
    first = site.images.column("filename")[0].as_py()
    twins = [r for r in rows if r["url"].endswith(("/" + first, "/dup.jpg"))]
    assert len(twins) == 2 and twins[0]["media_id"] == twins[1]["media_id"]
    assert {t["caption"] for t in twins} == {site.images.column("caption")[0].as_py(), "the first image again"}
    # media_id is the sha256 of the served file, of the stored object, and img2dataset's own column.
    served = hashlib.sha256((site.folder / first).read_bytes()).hexdigest()
    assert twins[0]["media_id"] == served
    check_store_invariants(root)
    assert len(list(layout.objects_dir(root).glob("*/*"))) == GOOD_IMAGES
    assert all(r["width"] >= 256 and r["format"] == "jpg" and r["run_id"] == report["run_id"] for r in rows)
    assert not layout.downloads_dir(root, report["run_id"]).exists()

    # A rerun hands img2dataset nothing it already has: no download, not one request to the server.
    requests_before = sum(site.requests.values())
    again = run_ingest(root, metadata)
    assert (again.admitted, again.stored, again.manifest_rows_added) == (0, 0, 0)
    assert again.skipped_known_urls == GOOD_IMAGES + 1  # every stored URL; the failed ones are tried again
    assert sum(site.requests.values()) - requests_before == 6  # missing, truncated, page, empty, huge, slow
    assert len(manifest(root)) == GOOD_IMAGES + 1
    assert len(list(layout.objects_dir(root).glob("*/*"))) == GOOD_IMAGES


def test_rerun_fetches_no_known_url_and_refetch_rechecks_them(tmp_path, site):
    names = site.images.column("filename").to_pylist()[:3]
    meta = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": [f"{site.base}/{n}" for n in names], "TEXT": names}), meta)
    root = tmp_path / "data"
    assert run_ingest(root, meta).stored == 3

    before = site.requests.copy()
    rerun = run_ingest(root, meta)
    assert (rerun.skipped_known_urls, rerun.admitted, rerun.stored) == (3, 0, 0)
    assert site.requests == before  # img2dataset was not even started
    assert cli("ingest", "--metadata", str(meta), "--data-dir", str(root)) == 0  # nothing new is not a failure

    refetched = run_ingest(root, meta, refetch=True)
    assert (refetched.skipped_known_urls, refetched.admitted, refetched.already_in_manifest) == (0, 3, 3)
    assert all(site.requests[f"/{n}"] == before[f"/{n}"] + 1 for n in names)
    assert len(manifest(root)) == 3


def test_folder_ingest_reads_sidecar_captions_and_is_idempotent(tmp_path):
    folder = tmp_path / "photos"
    images = synthetic.write_images(folder / "nested", 5, seed=3)
    names = images.column("filename").to_pylist()
    (folder / "nested" / names[0]).with_suffix(".txt").write_text("a caption from the sidecar\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    synthetic.render(synthetic.ALL_SCENES[0], 300, np.random.default_rng(0)).save(folder / "p.png")
    root = tmp_path / "data"

    report = ingest.ingest_folder(root, folder)
    assert (report.rows_read, report.stored, report.failed) == (7, 6, {"decode error": 1})
    rows = {Path(r["url"].removeprefix("file://")).name: r for r in manifest(root)}
    assert rows[names[0]]["caption"] == "a caption from the sidecar"
    assert rows[names[1]]["caption"] == ""
    assert rows["p.png"]["format"] == "png" and rows["p.png"]["path"].endswith(".png")
    assert all(r["url"].startswith("file:///") for r in rows.values())
    check_store_invariants(root)
    assert (root / "bronze" / "manifest").is_dir() and (folder / "nested" / names[1]).exists()  # copied, not moved

    again = ingest.ingest_folder(root, folder)
    assert (again.stored, again.manifest_rows_added) == (0, 0)


@pytest.mark.parametrize(
    "make, args, expected",
    [
        (None, ["--metadata", "nowhere.parquet"], "metadata file not found"),
        ("columns", ["--url-col", "LINK"], "column 'LINK' not found; columns are: URL, TEXT"),
        ("columns_no_url", [], "no URL column (URL or url) found; columns are: link, TEXT"),
        ("empty", [], "has no rows"),
        ("garbage", [], "cannot read metadata"),
        ("unsupported", [], "unsupported metadata format"),
    ],
)
def test_bad_commands_get_one_clear_line(tmp_path, capsys, make, args, expected):
    path = tmp_path / {"garbage": "m.parquet", "unsupported": "m.xlsx"}.get(make, "m.parquet")
    if make in ("columns", "empty"):
        n = 0 if make == "empty" else 1
        pq.write_table(pa.table({"URL": ["http://127.0.0.1/x.jpg"] * n, "TEXT": ["x"] * n}), path)
    elif make == "columns_no_url":
        pq.write_table(pa.table({"link": ["http://127.0.0.1/x.jpg"], "TEXT": ["x"]}), path)
    elif make in ("garbage", "unsupported"):
        path.write_bytes(b"this is not parquet")
    argv = args if args and args[0] == "--metadata" else ["--metadata", str(path), *args]
    rc = cli("ingest", *argv, "--data-dir", str(tmp_path / "data"))
    err = capsys.readouterr().err
    assert rc != 0
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_csv_tsv_jsonl_with_lowercase_columns(tmp_path, site):
    """Each format is read the same; one of them is fetched end to end (the fetch does not care which)."""
    base = site.base
    names = site.images.column("filename").to_pylist()[:2]
    (tmp_path / "m.csv").write_text("url,caption\n" + "".join(f"{base}/{n},csv {n}\n" for n in names))
    (tmp_path / "m.tsv").write_text("url\tcaption\n" + "".join(f"{base}/{n}\ttsv, {n}\n" for n in names))
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"url": f"{base}/{n}", "caption": f"jsonl {n}"}) + "\n" for n in names)
    )
    for ext, caption in [("csv", "csv {}"), ("tsv", "tsv, {}"), ("jsonl", "jsonl {}")]:
        table = ingest.read_metadata(tmp_path / f"m.{ext}")
        assert dict(zip(table.column("url").to_pylist(), table.column("caption").to_pylist())) == {
            f"{base}/{n}": caption.format(n) for n in names
        }, ext
    root = tmp_path / "data"
    report = run_ingest(root, tmp_path / "m.tsv")  # the one whose captions hold the other format's separator
    assert (report.rows_read, report.admitted, report.stored, report.failed_total) == (2, 2, 2, 0)
    assert {r["url"]: r["caption"] for r in manifest(root)} == {f"{base}/{n}": f"tsv, {n}" for n in names}


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, contextlib, io\n"
        "from rayclip.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'faiss', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _GateHandler(synthetic._QuietHandler):
    """Serves a folder; /gate.jpg answers only once `opened` is set (or after GATE_WAIT_S)."""

    opened = threading.Event()
    waited: list[bool] = []  # per /gate.jpg request: was it opened (True) or did the wait run out

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/gate.jpg":
            self.waited.append(self.opened.wait(GATE_WAIT_S))
            self.path = "/" + self.server.gate_file
        super().do_GET()


GATE_WAIT_S = 15


def test_img2dataset_spawns_processes_that_import_it_without_torch(tmp_path, good_metadata, monkeypatch):
    """img2dataset's spawned processes (its logger and its workers) run our light main module first
    (download.spawned), so they import img2dataset without torch; this process's __main__ and its
    imports are as before."""
    import multiprocessing
    import multiprocessing.spawn

    from helpers import spawn_probe

    real_main, prepared = sys.modules["__main__"], []
    preparation_data = multiprocessing.spawn.get_preparation_data  # what a spawned process starts from

    def recorded(name):
        prepared.append(preparation_data(name))
        return prepared[-1]

    monkeypatch.setattr(multiprocessing.spawn, "get_preparation_data", recorded)
    run_ingest(tmp_path / "data", good_metadata)
    assert len(prepared) >= 2  # the logger and a download worker
    assert {data.get("init_main_from_name") for data in prepared} == {download.spawned.__name__}

    with download._scratch_tmpdir(), download._spawned_from_ours():  # as img2dataset's own run is wrapped
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # as img2dataset makes its workers
            assert pool.apply(spawn_probe.torch_after_img2dataset) is False
    assert sys.modules["__main__"] is real_main
    assert sys.modules.get("torch", False) is not None  # torch stays importable here


def test_an_ingest_command_imports_img2dataset_without_loading_torch(tmp_path):
    """The command's own process imports img2dataset (download_and_admit, before it starts img2dataset)
    as its spawned ones do: torch is not loaded (webdataset's stand-ins instead), and no trace is left
    that would stop an embed in the same process from importing it after. (img2dataset's run and the
    shard follower are stubbed: they are not what is probed.)"""
    code = f"""
import collections, sys, types
import pyarrow as pa
from rayclip.stages.ingest import download
from rayclip.store import storage
download._img2dataset = lambda *args, **options: None
download._follow_shards = lambda *args: None
admitter = types.SimpleNamespace(rows_seen=0, failed=collections.Counter())
table = pa.table({{"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}})
download.download_and_admit(table, storage.data_root({str(tmp_path / "work")!r}), admitter, "multiprocessing", 1, None)
loaded = [m for m in sys.modules if m.startswith("torch.")]
print("img2dataset" in sys.modules, sys.modules.get("torch", "absent"), loaded)
"""
    done = bounded.run([sys.executable, "-c", code], 60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "absent", "[]"]


def test_many_shards_admitted_while_the_download_runs(tmp_path, site, monkeypatch):
    """Six URLs a shard: 30 URLs in 5 shards (one img2dataset worker process: it takes 5 shards
    before it is replaced), the same bytes under other URLs in other shards. The manifest
    holds every URL once, each object is stored once; and shards are admitted while img2dataset
    still runs: the last shard's /gate.jpg is answered only after an earlier shard was admitted
    (a run admitting only after the download would leave the gate shut until GATE_WAIT_S)."""
    monkeypatch.setattr(download, "SHARD_ROWS", (6, 6))
    names = site.images.column("filename").to_pylist()
    captions = site.images.column("caption").to_pylist()
    folder = site.folder
    gate = names[5]
    server = loopback.start(functools.partial(_GateHandler, directory=str(folder)), gate_file=gate)
    base = loopback.url(server)
    # 24 distinct images (shards 0-3), then 5 of them again under other URLs and the gate (shard 4).
    urls = [f"{base}/{n}" for n in names] + [f"{base}/{n}?again" for n in names[:5]] + [f"{base}/gate.jpg"]
    texts = captions + [f"again {i}" for i in range(5)] + ["the gate"]
    meta = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": texts}), meta)
    served = {
        u: hashlib.sha256((folder / n).read_bytes()).hexdigest() for u, n in zip(urls, names + names[:5] + [gate])
    }

    events: list[tuple[str, bool]] = []  # (what, had img2dataset returned yet)
    returned = threading.Event()
    img2dataset, admit_shard = download._img2dataset, admit.Admitter.admit_shard

    def timed_download(input_file, output_dir, distributor, shard_rows, **options):
        events.append((f"download starts, {shard_rows} rows a shard", False))
        try:
            img2dataset(input_file, output_dir, distributor, shard_rows, **options)
        finally:
            returned.set()

    def timed_admit_shard(self, shard):
        events.append((f"admit {shard.name}", returned.is_set()))
        admit_shard(self, shard)
        _GateHandler.opened.set()

    monkeypatch.setattr(download, "_img2dataset", timed_download)
    monkeypatch.setattr(admit.Admitter, "admit_shard", timed_admit_shard)
    _GateHandler.opened.clear()
    _GateHandler.waited.clear()
    stored_while_downloading = []
    root = tmp_path / "data"
    try:
        report = ingest.ingest_metadata(
            root,
            meta,
            timeout=GATE_WAIT_S + 5,
            store_progress=lambda done, total: stored_while_downloading.append((done, not returned.is_set())),
        )
    finally:
        server.shutdown()
        server.server_close()

    assert events[0] == ("download starts, 6 rows a shard", False)
    shards = [what for what, _ in events[1:]]
    assert len(shards) == 5 and len(set(shards)) == 5  # 30 rows, six a shard, each admitted once
    # The gate opened when a shard was admitted, before the wait ran out: admission overlapped the download.
    assert _GateHandler.waited == [True]
    early = [what for what, after in events[1:] if not after]
    assert len(early) >= 1, events
    assert any(during for _, during in stored_while_downloading)  # the store progress moved meanwhile

    assert (report.rows_read, report.admitted, report.stored, report.duplicates) == (30, 30, 24, 6)
    assert report.failed == {} and report.manifest_rows_added == 30
    rows = manifest(root)
    assert sorted(r["url"] for r in rows) == sorted(urls)  # every URL once
    assert all(r["media_id"] == served[r["url"]] for r in rows)
    assert {r["url"]: r["caption"] for r in rows} == dict(zip(urls, texts))
    assert len({r["media_id"] for r in rows}) == 24
    objects = sorted(p.stem for p in layout.objects_dir(root).glob("*/*"))
    assert objects == sorted(set(served.values()))  # one object per distinct bytes
    check_store_invariants(root)


def test_shards_finished_as_the_download_ends_are_admitted_too(tmp_path, monkeypatch):
    """The follower's last pass, after img2dataset returned, lists the shards again: those finished
    since its previous pass (here every one: it would not poll again for a minute) are admitted."""
    monkeypatch.setattr(download, "POLL_S", 60)
    admitted = []

    class Recorder:
        def admit_shard(self, shard):
            admitted.append(shard.name)

    class Finished(threading.Event):
        """img2dataset's end; says when the follower, its first pass done, waits for it."""

        waiting = threading.Event()

        def wait(self, timeout=None):
            self.waiting.set()
            return super().wait(timeout)

    out = tmp_path / "out"
    out.mkdir()
    finished = Finished()
    follower = threading.Thread(target=download._follow_shards, args=(storage.location(out), Recorder(), finished))
    follower.start()
    assert finished.waiting.wait(10)  # the first pass found nothing; the next is a minute away
    for i in range(3):  # as img2dataset leaves a shard: its parquet, then its stats
        (out / f"{i:05d}.parquet").write_bytes(b"")
        (out / f"{i:05d}_stats.json").write_text("{}")
    finished.set()
    follower.join(10)
    assert not follower.is_alive() and sorted(admitted) == ["00000.parquet", "00001.parquet", "00002.parquet"]
