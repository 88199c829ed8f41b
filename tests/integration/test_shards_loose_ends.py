"""docs/shards.md's smaller promises, each proven on real shards read back: export's --min-score,
failure reasons, abort_shard and run record; shard ingest's hash check, part size, cut tars and
--limit; and --force redoing captions, each once."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.shards import webdataset_tar
from helpers.stores import cli

from rayclip import export
from rayclip.query.terms import Term
from rayclip.stages import ingest
from rayclip.stages.ingest import admit
from rayclip.store import catalog, layout


@pytest.fixture
def gold_scratch(gold_store, tmp_path) -> Path:
    """A private copy of the shared gold store for each test: tests here delete and change its objects,
    and an export writes its run record into the data root."""
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    return root


def _single_row_objects(root, count: int) -> list[dict]:
    """`count` manifest rows whose media_id no other row shares (so one object is one sample)."""
    rows = catalog.read_manifest(root, ["media_id", "path"]).to_pylist()
    ids = [r["media_id"] for r in rows]
    return sorted((r for r in rows if ids.count(r["media_id"]) == 1), key=lambda r: r["media_id"])[:count]


def _where(rows: list[dict]) -> str:
    return "media_id IN (" + ", ".join(f"'{r['media_id']}'" for r in rows) + ")"


def _scores(folder) -> dict[str, float]:
    """media_id → score of every exported sample, from the shards' Parquet sidecars."""
    tables = [pq.read_table(p, columns=["media_id", "score"]) for p in sorted(folder.glob("*.parquet"))]
    return {row["media_id"]: row["score"] for table in tables for row in table.to_pylist()}


# ---------------------------------------------------------------- export


def test_min_score_exports_every_result_at_or_above_it_however_deep(gold_scratch, site, tmp_path, monkeypatch):
    query = [Term("text", site.images.column("caption")[2].as_py())]
    everything = export.export(gold_scratch, tmp_path / "all", query, k=1000)
    ranked = sorted(_scores(tmp_path / "all").values(), reverse=True)
    assert everything.exported == len(ranked) >= 20
    threshold = ranked[11]  # a dozen results (ties included) score at least this much
    expected = {m for m, s in _scores(tmp_path / "all").items() if s >= threshold}

    monkeypatch.setattr(export, "QUERY_DEPTH", 2)  # the first depth falls short: searched deeper, 2 → 8 → 32
    report = export.export(gold_scratch, tmp_path / "min", query, min_score=threshold, samples_per_shard=5)
    scores = _scores(tmp_path / "min")
    assert set(scores) == expected and len(expected) >= 12
    assert min(scores.values()) >= threshold
    assert (report.selected, report.exported, report.shards) == (len(expected), len(expected), 3)


def test_objects_missing_or_changed_since_ingest_are_counted_by_reason_and_left_out(gold_scratch, tmp_path):
    rows = _single_row_objects(gold_scratch, 4)
    (gold_scratch / rows[0]["path"]).unlink()
    (gold_scratch / rows[1]["path"]).write_bytes((gold_scratch / rows[2]["path"]).read_bytes())  # another image's bytes
    report = export.export(gold_scratch, tmp_path / "out", where=_where(rows))
    assert report.failed == {catalog.MISSING_OBJECT: 1, catalog.CHANGED_OBJECT: 1}
    assert (report.selected, report.exported) == (4, 2)
    assert set(_tar_media_ids(tmp_path / "out")) == {rows[2]["media_id"], rows[3]["media_id"]}


def _tar_media_ids(folder) -> list[str]:
    """The media_ids of a filter export's tars, read from the samples' own .json."""
    ids = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            ids += [json.load(tar.extractfile(m))["media_id"] for m in tar if m.name.endswith(".json")]
    return ids


@pytest.mark.parametrize("format", ["webdataset", "parquet"])
def test_a_shard_whose_writing_fails_is_removed_and_the_finished_ones_kept(gold_scratch, tmp_path, monkeypatch, format):
    rows = _single_row_objects(gold_scratch, 4)
    reads = []
    real_read = export._read_object

    def fail_on_the_fourth(root, row):
        reads.append(row["media_id"])
        if len(reads) == 4:  # the second shard holds one sample by now
            raise OSError("disk full")
        return real_read(root, row)

    monkeypatch.setattr(export, "_read_object", fail_on_the_fourth)
    monkeypatch.setattr(export, "READ_AHEAD", 1)  # one read at a time: the fourth fails after three were added
    with pytest.raises(OSError) as raised:
        export.export(gold_scratch, tmp_path / "out", where=_where(rows), format=format, samples_per_shard=2)
    # Looked at while the failure's traceback (and so the writer) is still alive: an aborted shard is
    # removed by abort_shard, not by the writer's finaliser.
    assert str(raised.value) == "disk full"
    finished = {"webdataset": ["00000.parquet", "00000.tar"], "parquet": ["00000.parquet"]}[format]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == finished
    assert pq.read_table(tmp_path / "out" / "00000.parquet").num_rows == 2


def test_the_run_record_holds_what_was_selected_exported_and_failed(gold_scratch, tmp_path):
    rows = _single_row_objects(gold_scratch, 3)
    (gold_scratch / rows[0]["path"]).unlink()
    assert cli("export", "--data-dir", str(gold_scratch), "--where", _where(rows), "--to", str(tmp_path / "out")) == 0
    runs = layout.export_runs_dir(gold_scratch)
    [record_file] = runs.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record_file.name == f"{record['run_id']}.json"
    assert not list(runs.glob("*.log"))  # the library said nothing: no empty log beside the record
    assert record["selection"] == f"every manifest row where {_where(rows)}"
    assert record["target"].endswith("out") and record["format"] == "webdataset"
    assert (record["selected"], record["exported"], record["shards"]) == (3, 2, 1)
    assert record["failed"] == {catalog.MISSING_OBJECT: 1}
    assert record["image_bytes"] == sum((gold_scratch / r["path"]).stat().st_size for r in rows[1:])
    assert record["wall_s"] > 0


# ---------------------------------------------------------------- shard ingest


def _images(site, count: int) -> list[bytes]:
    return [(site.folder / n).read_bytes() for n in site.images.column("filename").to_pylist()[:count]]


def _captions(root) -> set[str]:
    return set(catalog.read_manifest(root, ["caption"]).column("caption").to_pylist())


def test_a_member_whose_bytes_do_not_match_its_claimed_media_id_is_a_hash_mismatch(site, tmp_path):
    import hashlib

    images = _images(site, 2)
    claims = [hashlib.sha256(images[0]).hexdigest(), hashlib.sha256(images[0]).hexdigest()]  # the second lies
    samples = [(f"{i}", {"jpg": images[i], "json": json.dumps({"media_id": claims[i]}).encode()}) for i in range(2)]
    (tmp_path / "00000.tar").write_bytes(webdataset_tar(samples))
    report = ingest.ingest_webdataset(tmp_path / "data", f"{tmp_path}/00000.tar")
    assert (report.admitted, report.failed) == (1, {"hash mismatch": 1})
    assert catalog.read_manifest(tmp_path / "data", ["media_id"]).column("media_id").to_pylist() == [claims[0]]


def test_a_folder_ingest_commits_a_manifest_part_every_part_rows(site, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, data in enumerate(_images(site, 5)):
        (folder / f"{i}.jpg").write_bytes(data)
    monkeypatch.setattr(admit, "CHECK_BATCH", 1)  # rows are checked one by one: parts are cut at PART_ROWS
    monkeypatch.setattr(admit, "PART_ROWS", 2)
    report = ingest.ingest_folder(tmp_path / "data", folder)
    parts = catalog.manifest_parts(tmp_path / "data")
    assert report.manifest_rows_added == 5
    assert sorted(pq.read_metadata(p).num_rows for p in parts) == [1, 2, 2]


def test_a_tar_cut_at_a_member_header_keeps_the_samples_before_the_split_one(site, tmp_path):
    images = _images(site, 3)
    whole = webdataset_tar([(f"{i}", {"jpg": images[i], "txt": f"kept {i}".encode()}) for i in range(3)])
    last_caption_header = whole.index(b"2.txt")  # the name opens its header block
    (tmp_path / "00000.tar").write_bytes(whole[: last_caption_header + 100])  # inside that header
    report = ingest.ingest_webdataset(tmp_path / "data", f"{tmp_path}/00000.tar")
    assert (report.admitted, report.failed) == (2, {"truncated tar": 1})
    assert _captions(tmp_path / "data") == {"kept 0", "kept 1"}  # the third sample lost its caption: dropped


def test_a_tar_without_its_end_blocks_drops_its_last_sample_and_counts_the_cut(site, tmp_path):
    images = _images(site, 3)
    whole = webdataset_tar([(f"{i}", {"jpg": images[i], "txt": f"kept {i}".encode()}) for i in range(3)])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        last = tar.getmembers()[-1]
        data_end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    (tmp_path / "00000.tar").write_bytes(whole[:data_end])  # every member whole, no zero blocks after
    report = ingest.ingest_webdataset(tmp_path / "data", f"{tmp_path}/00000.tar")
    # Without the end blocks, nothing says the last sample had no more members: it is dropped.
    assert (report.admitted, report.failed) == (2, {"truncated tar": 1})
    assert _captions(tmp_path / "data") == {"kept 0", "kept 1"}


def test_limit_stops_a_shard_ingest_and_a_folder_ingest_after_n_samples(site, tmp_path):
    images = _images(site, 4)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        samples = [(f"{shard}{i}", {"jpg": images[2 * shard + i], "txt": f"{shard}{i}".encode()}) for i in range(2)]
        (shards / f"{shard:05d}.tar").write_bytes(webdataset_tar(samples))
    report = ingest.ingest_webdataset(tmp_path / "a", f"{shards}/*.tar", limit=3)
    assert (report.rows_read, report.admitted, report.manifest_rows_added) == (3, 3, 3)
    assert _captions(tmp_path / "a") == {"00", "01", "10"}

    folder = tmp_path / "images"
    folder.mkdir()
    for i, data in enumerate(images):
        (folder / f"{i}.jpg").write_bytes(data)
    report = ingest.ingest_folder(tmp_path / "b", folder, limit=2)
    assert (report.rows_read, report.manifest_rows_added) == (2, 2)
    assert catalog.read_manifest(tmp_path / "b").num_rows == 2


# ---------------------------------------------------------------- captions


def test_force_encodes_every_caption_again_and_a_plain_rerun_none(gold_scratch):
    from rayclip import model
    from rayclip.stages import captions

    spec = model.resolve(None, "reference")
    stored = catalog.read_silver(gold_scratch, spec.model_version, layout.CAPTIONS, ["caption_id"])
    distinct = len(set(stored.column("caption_id").to_pylist()))
    assert captions.plan(gold_scratch, spec.model_version)[1].num_rows == 0  # all encoded already

    # An image run that committed no caption (decode tasks, a plan made in Ray) leaves all of them to force.
    assert captions.plan(gold_scratch, spec.model_version, force=True, image_run="no-such-run")[1].num_rows == distinct
    forced = captions.embed_captions(gold_scratch, spec, batch_size=8, force=True)
    assert forced.captions_planned == forced.captions_embedded == distinct > 0
    assert forced.pairs_scored > 0
    again = catalog.read_silver(gold_scratch, spec.model_version, layout.CAPTIONS, ["caption_id"])
    assert again.num_rows == stored.num_rows + distinct  # the run's rows read back beside the first ones


def test_embed_force_encodes_each_caption_once_and_scores_every_pair_again(gold_scratch, ray_session):
    """`rayclip embed --force --limit 5`: the image run's actors encode the captions of the five images
    again, the caption stage after it every other caption of the embedded images, none of them a
    second time, and it scores every pair again."""
    from rayclip import model, pipeline

    spec = model.resolve(None, "reference")
    stored = catalog.read_silver(gold_scratch, spec.model_version, layout.CAPTIONS, ["caption_id"])
    pairs = catalog.read_silver(gold_scratch, spec.model_version, layout.CLIP_SCORES, ["media_id"]).num_rows
    embedded, captioned = pipeline.embed_silver(gold_scratch, spec, force=True, limit=5, batch_size=8)
    assert embedded.rows_embedded == 5 and embedded.captions_embedded > 0
    again = []  # the caption_ids the two runs committed
    for run in (embedded, captioned):
        rows = catalog.read_silver(gold_scratch, spec.model_version, layout.CAPTIONS, ["caption_id"], run.run_id)
        again += rows.column("caption_id").to_pylist() if rows else []
    assert sorted(again) == sorted(set(stored.column("caption_id").to_pylist()))  # each caption, once
    assert captioned.captions_embedded == len(again) - embedded.captions_embedded > 0
    assert captioned.pairs_scored == pairs > 0
