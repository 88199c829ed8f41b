"""The catalog reads only what a commit records: nothing was released, so no layout from before
sizes and commit records were recorded is read. Made-up vectors (no Ray)."""

from __future__ import annotations

import shutil

from helpers.silver import clustered, media_ids, reference_spec, write_manifest, write_silver

from rayclip.store import catalog, layout


def test_only_committed_parts_and_files_that_record_their_size_are_read(tmp_path):
    root, model_version = tmp_path / "data", reference_spec().model_version
    ids = media_ids(4)
    write_manifest(root, ids)
    committed = write_silver(root, "2026-01-01", ids, clustered(4))
    [part] = catalog.manifest_parts(root)
    assert catalog.recorded_size(part) == part.stat().st_size  # the helper writes as ingest does
    # A part whose name records no size, and a silver file no commit record names: not data.
    shutil.copy(part, layout.manifest_dir(root) / "part-0.parquet")
    shutil.copy(committed, committed.parent / "old.parquet")
    assert catalog.manifest_parts(root) == [part] and catalog.read_manifest(root).num_rows == 4
    assert catalog.silver_files(root, model_version) == [committed]
    assert catalog.silver_model_versions(root) == [model_version]
