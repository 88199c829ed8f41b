"""Every commit window's kill point on both stores: a local folder (a temporary name and a rename, a
flock) and moto's S3 on loopback (one PUT per object, a lease). Each test runs the command in a
subprocess that SIGKILLs itself at the point (`$RAYCLIP_KILL_AT`, no cleanup handler runs), then
checks that readers see the layer as before, that `rayclip status` lists the debris (on S3 once the
dead run's lease is stale), and that a rerun gives the rows an unkilled run gives.

The index build's points are tested on both stores in test_faults.py (its steps) and test_gold_s3.py."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers.bronze import check_objects, objects
from helpers.kills import assert_killed, rayclip
from helpers.site import GOOD_IMAGES
from helpers.stores import cli, copy_in, run_ingest, status

from rayclip import export, model
from rayclip.stages import captions, embed, ingest
from rayclip.store import catalog, layout, storage
from rayclip.store.storage import leases

REFERENCE = "clip_rayclip_ref_reference"
DAY = "2026-01-01"


@pytest.fixture(params=["local", "s3"])
def empty_root(request, tmp_path):
    """A fresh, empty data root on each store."""
    return tmp_path / "data" if request.param == "local" else request.getfixturevalue("s3_root")


def debris_after_kill(root, capsys, monkeypatch) -> list[str]:
    """What `status` lists once the killed run is known to be dead: at once locally (its flock died
    with it); on S3 only once its lease is stale (until then the run may be alive: nothing listed)."""
    if not storage.is_local(root):
        assert status(root, capsys)["debris"] == []
        monkeypatch.setattr(leases, "LEASE_STALE_S", 0.0)  # time passes: the lease goes stale
    return sorted(d["path"] for d in status(root, capsys)["debris"])


def manifest_keys(root) -> list[tuple]:
    """(media_id, url, caption) of every manifest row, each naming a whole stored object."""
    check_objects(root)
    return sorted((row["media_id"], row["url"], row["caption"]) for row in catalog.read_manifest(root).to_pylist())


# ---------------------------------------------------------------- ingest


def expected_metadata_rows(metadata: Path, site) -> list[tuple]:
    """What any unkilled ingest of `metadata` gives: each URL's bytes hashed straight from the site."""
    table = pq.read_table(metadata).to_pylist()
    sha = {row["URL"]: hashlib.sha256((site.folder / row["URL"].rsplit("/", 1)[1]).read_bytes()) for row in table}
    return sorted((sha[row["URL"]].hexdigest(), row["URL"], row["TEXT"]) for row in table)


def test_metadata_ingest_killed_in_each_window_then_rerun(empty_root, good_metadata, site, capsys, monkeypatch):
    """Killed once an object is stored (`rayclip gc` sweeps its work folder), then again, on top of
    what that run left, once a shard's objects are all stored before its manifest part; each time no
    manifest row is visible, and the rerun gives what an unkilled ingest gives."""
    root = empty_root
    args = ["--metadata", str(good_metadata), "--data-dir", storage.uri(root), "--timeout", "3"]
    for point in ("ingest.object_stored", "ingest.manifest_commit"):
        monkeypatch.undo()  # leases go stale at their own pace again: the next run's is live
        assert_killed(*rayclip("ingest", *args, kill_at=point))
        # The window is open: objects stored (at the first one's, maybe a few more from other threads; at
        # the manifest's commit, every object of the shard) ...
        stored = len(objects(root))
        assert stored == GOOD_IMAGES if point == "ingest.manifest_commit" else 1 <= stored < GOOD_IMAGES
        assert catalog.read_manifest(root).num_rows == 0  # ... and not one manifest row visible
        [work] = storage.children(layout.downloads_dir(root, "x").parent)
        assert debris_after_kill(root, capsys, monkeypatch) == [f"bronze/downloads/{work.name}"]
        if point == "ingest.object_stored":  # `rayclip gc` sweeps it (else the rerun does, first thing)
            capsys.readouterr()
            assert cli("gc", "--data-dir", storage.uri(root)) == 0
            assert f"removed bronze/downloads/{work.name}" in capsys.readouterr().out
            assert storage.children(layout.downloads_dir(root, "x").parent) == []

    report = run_ingest(root, good_metadata)
    assert (report.admitted, report.manifest_rows_added, report.failed_total) == (GOOD_IMAGES + 1,) * 2 + (0,)
    assert report.stored + report.duplicates == GOOD_IMAGES + 1  # what the killed runs stored counts as dups
    assert manifest_keys(root) == expected_metadata_rows(good_metadata, site)
    assert len(objects(root)) == GOOD_IMAGES
    assert storage.children(layout.downloads_dir(root, "x").parent) == []
    assert status(root, capsys)["debris"] == []


def _tar(samples: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, data in samples:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shard_ingest_killed_at_its_second_shard_keeps_the_first(empty_root, site, tmp_path, capsys, monkeypatch):
    """One manifest part per shard: a run killed at its second shard's commit keeps the first shard;
    the rerun adds the rest once, and ends with what an unkilled run gives."""
    root = empty_root
    names = site.images.column("filename").to_pylist()[:6]
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(3):
        samples = [(f"{shard}{i}", (site.folder / names[2 * shard + i]).read_bytes()) for i in range(2)]
        if shard == 2:  # the first shard's first image again, under another key: a duplicate across parts
            samples.append(("2x", (site.folder / names[0]).read_bytes()))
        (shards / f"{shard:05d}.tar").write_bytes(_tar(samples))
    pattern = f"{shards}/*.tar"

    kill_at = "ingest.manifest_commit:2"
    assert_killed(*rayclip("ingest", "--webdataset", pattern, "--data-dir", storage.uri(root), kill_at=kill_at))
    assert sorted(url.rpartition("#")[2] for _, url, _ in manifest_keys(root)) == ["00", "01"]
    assert len(objects(root)) >= 2  # the second shard's objects may be stored too, whole
    assert debris_after_kill(root, capsys, monkeypatch) == []  # a shard ingest keeps no work folder

    rerun = ingest.ingest_webdataset(root, pattern)
    assert (rerun.already_in_manifest, rerun.manifest_rows_added) == (2, 5)
    assert (rerun.stored, rerun.duplicates) == (2, 5)  # the second shard's objects were stored before the kill
    assert len(catalog.manifest_parts(root)) == 3  # the killed run's one, the rerun's two
    assert len(objects(root)) == 6
    unkilled = tmp_path / "unkilled"
    ingest.ingest_webdataset(unkilled, pattern)
    assert manifest_keys(root) == manifest_keys(unkilled)
    assert status(root, capsys)["debris"] == []


# ---------------------------------------------------------------- embed (images, then captions)


def silver_table(root, table: str = layout.EMBEDDINGS) -> pa.Table | None:
    """Every committed row of a silver table, read back whole (what any reader sees)."""
    return catalog.read_silver(root, REFERENCE, table, None)


def uncommitted(root, table: str) -> list[str]:
    """The relative paths of a silver table's files that no commit record names."""
    files = storage.glob(layout.silver_table_dir(root, table), layout.SILVER_FILES)
    committed = set(map(str, catalog.silver_files(root, REFERENCE, table=table)))
    return [str(f.relative_to(root)) for f in files if str(f) not in committed]


def assert_same_rows(got: pa.Table, unkilled: pa.Table, keys: list[str], value: str) -> None:
    """The same keys, and at each key the same value (a vector or a score) as an unkilled run's, up to
    the precision's rounding (a caption encoded in another batch differs in the third decimal)."""
    got, unkilled = got.sort_by([(k, "ascending") for k in keys]), unkilled.sort_by([(k, "ascending") for k in keys])
    assert got.select(keys).equals(unkilled.select(keys))
    as_array = catalog.vector_matrix if value == "embedding" else lambda t: t.column(value).to_numpy()
    np.testing.assert_allclose(as_array(got), as_array(unkilled), atol=5e-3)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two embed runs with an actor pool each, under load
def test_embed_killed_before_its_commit(empty_root, ingested, gold_store, ray_session, capsys, monkeypatch):
    """Killed between Ray's write and the commit record, into a partition that already holds a
    committed run (the ten smallest media_ids, with made-up vectors): readers see exactly that run."""
    from helpers.silver import write_silver

    root = empty_root
    copy_in(ingested, root)
    first_ten = sorted(set(catalog.read_manifest(root).column("media_id").to_pylist()))[:10]
    write_silver(root, DAY, first_ten, np.eye(10, 128))
    committed = catalog.silver_files(root, REFERENCE)
    args = ["--data-dir", storage.uri(root), "--pretrained", "reference", "--actors", "1", "--dt", DAY]
    cluster = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # the session's Ray: no start-up
    assert_killed(*rayclip("embed", *args, "--no-captions", kill_at="embed.commit", env=cluster, timeout=400))

    written = uncommitted(root, layout.EMBEDDINGS)
    assert written and catalog.silver_files(root, REFERENCE) == committed
    assert silver_table(root).column("media_id").to_pylist() == first_ten
    assert not [r for stage, _, r in catalog.run_records(root) if stage == "embed"]  # no run record either
    [work] = storage.children(layout.silver_work_dir(root, "x").parent)
    assert debris_after_kill(root, capsys, monkeypatch) == sorted([*written, f"silver/_work/{work.name}"])

    rerun = embed.embed(root, model.resolve(None, "reference"), actors=1, batch_size=8, dt=DAY)
    assert (rerun.rows_planned, rerun.rows_embedded, rerun.rows_failed) == (GOOD_IMAGES - 10,) * 2 + (0,)
    rows = silver_table(root)
    assert rows.num_rows == GOOD_IMAGES and len(set(rows.column("media_id").to_pylist())) == GOOD_IMAGES
    new = rows.filter(pc.invert(pc.is_in(rows.column("media_id"), pa.array(first_ten))))
    unkilled = silver_table(gold_store.root)
    unkilled = unkilled.filter(pc.is_in(unkilled.column("media_id"), new.column("media_id")))
    assert_same_rows(
        new.select(["media_id", "embedding"]), unkilled.select(["media_id", "embedding"]), ["media_id"], "embedding"
    )
    assert uncommitted(root, layout.EMBEDDINGS) == []  # the rerun swept the dead run's files
    assert status(root, capsys)["debris"] == []


CAPTION_TABLES = {layout.CAPTIONS: ["caption_id", "caption"], layout.CLIP_SCORES: ["media_id", "caption_id"]}
CAPTION_VALUES = {layout.CAPTIONS: "embedding", layout.CLIP_SCORES: "clip_score"}


def test_caption_run_killed_before_each_commit(empty_root, gold_store, capsys, monkeypatch):
    """`rayclip embed` with every image embedded encodes the captions (in the driver: a few), then
    scores the pairs; killed before the caption vectors' commit, then (a second run, on top of what
    the first left) before the scores' commit, the vectors committed. Readers see neither half; the
    rerun does what is missing and gives the unkilled rows."""
    root, built = empty_root, gold_store.root
    copy_in(built, root, lambda relative: relative.startswith(("bronze/", "silver/embeddings/")))
    before = status(root, capsys)["silver"]
    args = ["--data-dir", storage.uri(root), "--pretrained", "reference"]
    left: list[str] = []  # the killed runs' files, written and named by no commit record
    for nth, killed_table in [(1, layout.CAPTIONS), (2, layout.CLIP_SCORES)]:
        monkeypatch.undo()  # leases go stale at their own pace again: the next run's is live
        assert_killed(*rayclip("embed", *args, kill_at=f"captions.commit:{nth}", timeout=200))
        assert silver_table(root, killed_table) is None
        if killed_table == layout.CLIP_SCORES:
            assert_same_rows(
                silver_table(root, layout.CAPTIONS), silver_table(built, layout.CAPTIONS), ["caption_id"], "embedding"
            )
        else:
            assert silver_table(root, layout.CLIP_SCORES) is None
        assert status(root, capsys)["silver"] == before
        written = uncommitted(root, killed_table)
        assert written and uncommitted(root, layout.CAPTIONS) + uncommitted(root, layout.CLIP_SCORES) == left + written
        left += written
        work = [f"silver/_work/{w.name}" for w in storage.children(layout.silver_work_dir(root, "x").parent)]
        assert len(work) == nth  # one work folder per killed run
        assert debris_after_kill(root, capsys, monkeypatch) == sorted(left + work)

    rerun = captions.embed_captions(root, model.resolve(None, "reference"), batch_size=8)
    assert rerun.captions_embedded == 0  # the second run committed them
    for table, keys in CAPTION_TABLES.items():
        assert_same_rows(silver_table(root, table), silver_table(built, table), keys, CAPTION_VALUES[table])
    assert uncommitted(root, layout.CAPTIONS) == uncommitted(root, layout.CLIP_SCORES) == []
    assert status(root, capsys)["debris"] == []


# ---------------------------------------------------------------- export


def shard_contents(target) -> dict[str, object]:
    """Each file of an export, read whole: a tar's members (name -> bytes), a Parquet file's rows."""
    contents = {}
    for f in storage.children(target):
        data = storage.read_bytes(f)
        if f.name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # a cut tar fails to read
                contents[f.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        else:
            contents[f.name] = pq.read_table(io.BytesIO(data)).to_pylist()
    return contents


def test_export_killed_before_its_run_record(empty_root, ingested, capsys, tmp_path):
    """Killed with every shard written and no run record: each file in the target is whole and as an
    unkilled export writes it, the data root records no export and holds no debris, and the target is
    never mixed with a rerun's shards (refused in one line; a new target gets the same samples)."""
    root = empty_root
    copy_in(ingested, root)
    target = f"{storage.uri(root)}-export" if not storage.is_local(root) else str(tmp_path / "export")
    args = ["--data-dir", storage.uri(root), "--samples-per-shard", "10"]
    assert_killed(*rayclip("export", *args, "--to", target, kill_at="export.finish"))

    assert storage.glob(layout.export_runs_dir(root), layout.RUN_RECORDS) == []
    assert status(root, capsys)["debris"] == []
    killed = shard_contents(storage.location(target))
    assert sorted(killed) == [f"0000{i}.{ext}" for i in range(3) for ext in ("parquet", "tar")]

    capsys.readouterr()
    assert cli("export", *args, "--to", target) != 0
    [refused] = capsys.readouterr().err.strip().splitlines()
    assert refused.endswith("is not empty; export into a new or empty folder")
    report = export.export(root, f"{target}-again", samples_per_shard=10)
    assert report.exported == GOOD_IMAGES + 1 and report.shards == 3
    assert killed == shard_contents(storage.location(f"{target}-again"))
    assert [r.name for r in storage.glob(layout.export_runs_dir(root), layout.RUN_RECORDS)] == [f"{report.run_id}.json"]
