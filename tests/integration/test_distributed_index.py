"""The gold build's steps as Ray tasks and in one process, in each form the finished index takes (one
file, merged on disk and memory-mapped, shards); the same build on a two-node cluster is in
test_two_nodes.py."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers.index_builds import FILES, PART_VECTORS, REFERENCE, open_build, quantizer_of, search, write_day_files
from helpers.silver import clustered, media_ids, write_manifest, write_silver
from helpers.stores import cli

from rayclip import ann
from rayclip.stages import index
from rayclip.store import catalog, layout


def test_auto_takes_a_mergeable_family_for_parts_and_says_why():
    """Fast-scan and Refine codes cannot be merged: a build in parts, on disk or in shards gets the
    family that can, and build.json's steps.auto says which it did not take."""
    alone = ann.choose_index_type(1_000_000, 512, 4 << 30)
    assert not ann.mergeable(alone)  # one part: auto's first choice, fast-scan codes refined
    shape = index.full.Shape("local", 250_000, 1, False)
    chosen, form, note = index.full.choose_type(1_000_000, 512, "auto", 4 << 30, shape)
    assert (chosen, form) == ("IVF4096,SQ6", "single") and ann.mergeable(chosen)
    assert note == f"auto took IVF4096,SQ6, not {alone}, which cannot be merged from parts"
    assert index.full.choose_type(1_000_000, 512, "auto", 4 << 30, index.full.Shape("local", 4_000_000, 1, False)) == (
        alone,
        "single",
        "",
    )


@pytest.mark.parametrize("options", [{"shards": 2}, {"on_disk": True}])
def test_a_type_that_cannot_merge_refuses_shards_and_on_disk(tmp_path, options):
    from rayclip.errors import UserError

    root = tmp_path / "data"
    write_silver(root, "2026-01-01", media_ids(300), clustered(300))
    with pytest.raises(UserError, match=r"^--index-type HNSW32 cannot be merged on disk or into shards"):
        index.build(root, index_type="HNSW32", parallel="local", **options)
    assert catalog.builds(root, REFERENCE) == []


def test_a_changed_vector_on_a_sharded_build_is_a_full_build_that_says_why(tmp_path):
    """A base kept in shards takes new rows as a new part, but cannot replace a vector: rebuilt."""
    root = tmp_path / "data"
    ids, vectors = media_ids(1000), clustered(1000)
    write_silver(root, "2026-01-01", ids, vectors)
    asked = {"index_type": "IVF8,SQ8", "part_vectors": 500, "parallel": "local", "shards": 2}
    index.build(root, **asked)
    write_silver(root, "2026-01-02", ids[:100], clustered(100, seed=4))  # re-embedded: newer vectors
    grown = index.build(root, **asked)
    info = catalog.build_info(root, REFERENCE, grown.build_id)
    assert info.base_build is None and info.count == 1000 and info.steps["parts"] == 2
    assert info.full_build_reason == "a base kept as 'shards' cannot replace the vectors of 100 changed media_ids"


def test_an_on_disk_build_counts_its_lists_in_index_bytes_and_publishes_no_working_file(tmp_path):
    """build.json's index_bytes is what status and serve count (catalog.index_bytes): for a build merged
    on disk, index.faiss and index.ivfdata together."""
    root = tmp_path / "data"
    write_silver(root, "2026-01-01", media_ids(1000), clustered(1000))
    report = index.build(root, index_type="IVF8,SQ8", part_vectors=500, parallel="local", on_disk=True)
    info = catalog.build_info(root, REFERENCE, report.build_id)
    on_disk = info.file_bytes["index.faiss"] + info.file_bytes["index.ivfdata"]
    assert info.file_bytes["index.ivfdata"] > 0
    assert report.index_bytes == info.index_bytes == catalog.index_bytes(info) == on_disk
    # The steps' working files (trained.faiss, the parts) are gone: the published build is its index files,
    # the mapping (and its Arrow serving copy), the tuning queries and the trained quantizer (what an
    # incremental build adds its parts onto).
    published = sorted(p.name for p in layout.build_dir(root, REFERENCE, report.build_id).iterdir())
    assert (
        published
        == sorted(["build.json", *info.file_bytes])
        == [
            "build.json",
            "index.faiss",
            "index.ivfdata",
            "mapping.arrow",
            "mapping.parquet",
            "trained.faiss",
            "tuning.npz",
        ]
    )


def test_shards_alone_splits_a_small_store_into_that_many_shards(tmp_path):
    """`rayclip index --shards 2` without --part-vectors: parts of at most half the vectors (the 4M
    default would make one part, too few for two shards)."""
    root = tmp_path / "data"
    write_silver(root, "2026-01-01", media_ids(1001), clustered(1001))
    args = ["index", "--data-dir", str(root), "--index-type", "IVF8,SQ8", "--parallel", "local", "--shards", "2"]
    assert cli(*args) == 0
    [build_id] = catalog.builds(root, REFERENCE)
    info = catalog.build_info(root, REFERENCE, build_id)
    assert info.form == "shards" and info.steps["parts"] == 2 and info.steps["part_vectors"] == 501
    assert info.shards == [
        {"file": "shard-00000.faiss", "first": 0, "count": 501},
        {"file": "shard-00001.faiss", "first": 501, "count": 500},
    ]


def test_the_training_sample_is_drawn_from_every_silver_file(tmp_path, monkeypatch):
    """Training reads a uniform random sample of all chosen rows: with the sample far smaller than the
    store, its rows still come from every day's file, not from the first (oldest) rows."""
    root = tmp_path / "data"
    write_day_files(root)
    monkeypatch.setattr(index.full, "TRAIN_SAMPLE", 100)
    monkeypatch.setattr(index.full, "TUNING_QUERIES", 50)
    seen = {}
    train = index.parts.train

    def recording_train(plan, sample, is_query, is_training):
        days = np.repeat([f.parent.name for f in sample.files], [len(rows) for rows in sample.rows])
        seen["training"], seen["queries"] = days[is_training], days[is_query]
        return train(plan, sample, is_query, is_training)

    monkeypatch.setattr(index.parts, "train", recording_train)
    index.build(root, index_type="IVF4,SQ8", parallel="local")
    assert len(seen["training"]) == 100 and len(seen["queries"]) == 50
    assert sorted(set(seen["training"])) == [f"dt=2026-01-0{f + 1}" for f in range(FILES)]


def test_auto_merges_on_disk_when_no_index_fits_the_memory_budget(tmp_path):
    root = tmp_path / "data"
    write_silver(root, "2026-01-01", media_ids(1000), clustered(1000))
    report = index.build(root, max_index_memory="1K", parallel="local")
    info = catalog.build_info(root, REFERENCE, report.build_id)
    assert info.form == "ondisk" and "index.ivfdata" in info.file_bytes
    assert info.steps["auto"] == "no index of 1000 vectors fits --max-index-memory in RAM: merged on disk"


def test_every_add_task_reads_one_shared_copy_of_the_tuning_queries(tmp_path, monkeypatch):
    """The tuning queries (1,000 × dim floats) go to the add tasks as one shared object (one ray.put
    when the steps run as Ray tasks), not one copy per part: at 5,000 parts that is 10 GB."""
    root = tmp_path / "data"
    write_day_files(root)
    adds, shared = [], []
    run, share = index.parts.Runner.run, index.parts.Runner.share

    def recording_share(self, value):
        shared.append(share(self, value))
        return shared[-1]

    def recording_run(self, calls, memory, progress=None):
        adds.extend(call for call in calls if call[0] is index.parts.add)
        return run(self, calls, memory, progress)

    monkeypatch.setattr(index.parts.Runner, "share", recording_share)
    monkeypatch.setattr(index.parts.Runner, "run", recording_run)
    index.build(root, index_type="IVF8,SQ8", part_vectors=PART_VECTORS, parallel="local")
    [queries] = shared
    assert len(adds) == 4 and all(call[-1] is queries for call in adds)
    assert queries.queries.shape == (1000, 128) and (queries.ids == -1).all()  # left empty: each task fills its own


def test_rows_chosen_in_buckets_are_the_ones_one_sort_of_all_rows_chooses(tmp_path, monkeypatch):
    """The build's first steps (bucket by media_id, keep the newest per bucket) against one sort of
    every row, with media_ids repeated within and across files and embedded_at tied."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayclip.stages.index import parts, select

    rng = np.random.default_rng(5)
    files = []
    for f in range(5):
        ids = [f"m{i}" for i in rng.integers(0, 400, 300)]  # short, not hex: the hash still splits them
        at = pa.array(rng.integers(0, 4, 300) * 10**6, pa.timestamp("us", tz="UTC"))
        files.append(tmp_path / f"{f}.parquet")
        pq.write_table(pa.table({"media_id": ids, "embedded_at": at}), files[-1])
    monkeypatch.setattr(select, "BUCKET_ROWS", 100)  # 15 buckets
    monkeypatch.setattr(select, "GROUP_ROWS", 500)  # a bucket task per file
    chose = []
    newest_keys = select.newest_keys

    def counted(*args):
        keys, dropped = newest_keys(*args)
        chose.append(len(keys))
        return keys, dropped

    monkeypatch.setattr(select, "newest_keys", counted)
    folder = tmp_path / "build"
    file_idx, row_idx, dropped = select.select(parts.Runner(False), folder, files, [300] * 5)
    assert len(chose) == 15 and sum(n > 0 for n in chose) > 1  # the choice went through many buckets
    # The oracle, in plain Python: per media_id the newest embedded_at, then the later file, then the
    # first row of that file; the chosen rows in file-then-row order.
    best = {}
    for f, path in enumerate(files):
        table = pq.read_table(path).to_pydict()
        for r, (media_id, at) in enumerate(zip(table["media_id"], table["embedded_at"])):
            best[media_id] = max(best.get(media_id, (at, f, -r)), (at, f, -r))
    expected = sorted((f, -negative_row) for _, f, negative_row in best.values())
    assert dropped == 5 * 300 - len(best) > 0
    assert list(zip(file_idx.tolist(), row_idx.tolist())) == expected
    assert not layout.buckets_dir(folder).exists()  # working files gone


def test_a_task_that_crashes_is_one_line_and_exit_1(tmp_path, ray_session, monkeypatch, capfd):
    """A plain exception inside a Ray task (a bug, not a refusal) ends the command with one line, no
    traceback, exit status 1, and publishes nothing."""
    from rayclip.stages.index import parts

    root = tmp_path / "data"
    ids = media_ids(1200)
    write_silver(root, "2026-01-01", ids, clustered(1200))
    write_manifest(root, ids)

    def add(*args):  # defined here, so Ray ships it by value: the worker runs this, not parts.add
        raise RuntimeError("the part's disk is on fire\nsecond line of the error")

    monkeypatch.setattr(parts, "add", add)
    capfd.readouterr()
    flags = ["--index-type", "IVF16,SQ8", "--parallel", "ray", "--part-vectors", "600"]
    assert cli("index", "--data-dir", str(root), *flags) == 1
    out, err = capfd.readouterr()
    assert err == "rayclip index: error: the build's add task failed: RuntimeError: the part's disk is on fire\n", err
    assert "Traceback" not in out + err
    assert catalog.current_build(root, REFERENCE) is None


@pytest.mark.parametrize("form", [{"on_disk": True}, {"shards": 2}], ids=["ondisk", "shards"])
def test_an_incremental_build_on_disk_or_in_shards_answers_as_a_full_build(tmp_path, form):
    """New silver on a base kept on disk or in shards: added as a new part on the base's quantizer (the
    record says incremental), and it answers as a full build of the same rows (searched exhaustively:
    the full build trains another quantizer, so only nprobe = nlist compares them exactly)."""
    root = tmp_path / "data"
    ids, vectors = media_ids(3000), clustered(3000)
    write_silver(root, "2026-01-01", ids[:2400], vectors[:2400])
    write_manifest(root, ids)
    options = {"index_type": "IVF16,Flat", "parallel": "local", "part_vectors": 1200} | form
    base = index.build(root, **options)
    base_folder = layout.build_dir(root, REFERENCE, base.build_id)
    base_files = {f.name: f.read_bytes() for f in base_folder.iterdir()}
    write_silver(root, "2026-01-02", ids[2400:], vectors[2400:])
    grown = index.build(root, **options)
    assert {f.name: f.read_bytes() for f in base_folder.iterdir()} == base_files  # the base left whole
    centroids = quantizer_of(faiss.read_index(str(layout.quantizer_file(base_folder))))
    assert centroids.shape == (16, 128)
    _, held, _ = open_build(root, grown.build_id)
    for part in held + [
        faiss.read_index(str(layout.quantizer_file(layout.build_dir(root, REFERENCE, grown.build_id))))
    ]:
        np.testing.assert_array_equal(quantizer_of(part), centroids)  # on the base's trained quantizer
    info = catalog.build_info(root, REFERENCE, grown.build_id)
    assert (grown.base_build, info.incremental) == (base.build_id, {"added": 600, "replaced": 0})
    assert info.form == ("ondisk" if "on_disk" in form else "shards") and info.count == 3000
    if info.form == "shards":  # the new rows merged into the base's last shard, ids global
        assert [(s["first"], s["count"]) for s in info.shards] == [(0, 1200), (1200, 1800)]
    full = index.build(root, **options, retrain=True)
    queries = clustered(200, seed=9)
    found = [search(open_build(root, b), {"nprobe": 16}, queries) for b in (grown.build_id, full.build_id)]
    np.testing.assert_array_equal(found[0][1], found[1][1])
    np.testing.assert_allclose(found[0][0], found[1][0], atol=1e-5)
    mappings = [
        catalog.read_parquet(layout.mapping_file(layout.build_dir(root, REFERENCE, b)))
        for b in (grown.build_id, full.build_id)
    ]
    assert mappings[0].column("media_id").equals(mappings[1].column("media_id"))


def test_a_sharded_base_keeps_its_shard_count_through_increments_and_full_builds(tmp_path):
    """A plain `rayclip index` on a 2-shard base: new rows grow its last shard (never a third), a
    re-embedded vector (which a base in shards cannot replace) falls back to a full build in 2 shards,
    `--shards 4` on it is a full build in 4, and `--retrain` builds in the form asked (one file)."""
    root = tmp_path / "data"
    ids, vectors = media_ids(2600), clustered(2600)
    write_silver(root, "2026-01-01", ids[:2400], vectors[:2400])
    write_manifest(root, ids)
    plain = {"index_type": "IVF16,Flat", "parallel": "local", "part_vectors": 1200}
    base = index.build(root, **plain, shards=2)
    write_silver(root, "2026-01-02", ids[2400:], vectors[2400:])
    grown = catalog.build_info(root, REFERENCE, index.build(root, **plain).build_id)
    assert (grown.base_build, grown.form) == (base.build_id, "shards")
    assert [(s["first"], s["count"]) for s in grown.shards] == [(0, 1200), (1200, 1400)]
    last = faiss.read_index(str(layout.build_dir(root, REFERENCE, grown.build_id) / grown.shards[1]["file"]))
    assert last.ntotal == 1400
    write_silver(root, "2026-01-03", ids[:300], clustered(300, seed=4))  # 300 ids re-embedded
    rebuilt = catalog.build_info(root, REFERENCE, index.build(root, **plain).build_id)
    assert rebuilt.base_build is None and "cannot replace" in rebuilt.full_build_reason
    assert (rebuilt.form, len(rebuilt.shards)) == ("shards", 2)
    four = catalog.build_info(root, REFERENCE, index.build(root, **plain, shards=4).build_id)
    assert four.base_build is None and "asked for 4" in four.full_build_reason
    assert (four.form, [s["count"] for s in four.shards]) == ("shards", [650] * 4)
    assert catalog.build_info(root, REFERENCE, index.build(root, **plain, retrain=True).build_id).form == "single"


def test_a_full_build_whose_mapping_repeats_a_media_id_is_refused(tmp_path, monkeypatch):
    """The uniqueness check counts the written mapping's media_ids: a row chosen twice (a bug in the
    choice) publishes nothing."""
    from rayclip.errors import UserError
    from rayclip.stages.index import select

    root = tmp_path / "data"
    ids = media_ids(1200)
    write_silver(root, "2026-01-01", ids, clustered(1200))
    write_manifest(root, ids)
    chosen = select.select

    def twice_chosen(*args):
        file_idx, row_idx, dropped = chosen(*args)
        return np.append(file_idx, file_idx[7]), np.append(row_idx, row_idx[7]), dropped

    monkeypatch.setattr(select, "select", twice_chosen)
    with pytest.raises(UserError, match="index has 1201 vectors, mapping 1201, unique ids 1200"):
        index.build(root, index_type="flat", parallel="local")
    assert catalog.current_build(root, REFERENCE) is None


def test_a_refill_after_auto_went_on_disk_stays_on_disk_in_a_clean_folder(tmp_path, monkeypatch):
    """auto merged on disk (nothing fits --max-index-memory in RAM), then its measured recall sends it
    to another type: the second fill keeps the first's form and leaves none of its files behind."""
    root = tmp_path / "data"
    ids = media_ids(2000)
    write_silver(root, "2026-01-01", ids, clustered(2000))
    write_manifest(root, ids)
    monkeypatch.setattr(ann, "fallback_for", lambda index_type: "IVF8,Flat")  # whatever auto picked
    report = index.build(root, max_index_memory="64KB", target_recall=1.0, parallel="local", part_vectors=1000)
    info = catalog.build_info(root, REFERENCE, report.build_id)
    assert (info.index_type, info.form) == ("IVF8,Flat", "ondisk") and info.auto_rejected
    folder = layout.build_dir(root, REFERENCE, report.build_id)
    assert {f.name for f in folder.iterdir()} == {*info.file_bytes, layout.build_info_file(folder).name}


def test_media_ids_that_share_their_first_digits_are_still_told_apart(tmp_path):
    """Zero-padded counters as media_ids (as benchmarks write) are distinct to the mapping's check."""
    root = tmp_path / "data"
    counters = [f"{i:064x}" for i in range(300)]
    write_silver(root, "2026-01-01", counters, clustered(300))
    report = index.build(root, index_type="IVF8,SQ8", part_vectors=100, parallel="local")
    mapping = catalog.read_parquet(layout.mapping_file(layout.build_dir(root, REFERENCE, report.build_id)))
    assert report.count == 300 and sorted(mapping.column("media_id").to_pylist()) == counters


def test_an_add_task_holds_its_part_once_not_in_pieces_and_again_joined(tmp_path):
    """A part's vectors are read file by file into one array: the task's peak grows by the part and
    one file's read beside it, not twice the part (the add tasks' declared memory counts on it)."""
    root = tmp_path / "data"
    count, files = 200_000, 8
    for f in range(files):
        rows = slice(f * count // files, (f + 1) * count // files)
        write_silver(root, f"2026-01-0{f + 1}", media_ids(count)[rows], clustered(count // files, seed=f))
    silver = catalog.silver_files(root, REFERENCE)
    source = index.parts.Rows(silver, [np.arange(count // files)] * files)
    Path("/proc/self/clear_refs").write_text("5")  # this process's peak RSS starts again from here
    start = peak_rss_kib()
    vectors = index.parts.read_vectors(source, 1e-3)
    grown = (peak_rss_kib() - start) << 10
    # 1.46 alone (the part, and one file's read in Arrow and as numpy), 1.61 seen on a loaded machine
    # (the allocators give pages back later); in pieces and joined: 3.0.
    assert len(vectors) == count and grown < 1.8 * vectors.nbytes, grown / vectors.nbytes


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
