"""Claims the docs make about the whole tool, each checked where a user would see it."""

from __future__ import annotations

import json
import re
import shutil

from helpers.silver import clustered, media_ids, write_silver
from helpers.stores import cli

from rayclip.store import layout


def test_index_missing_its_recall_target_warns_on_stderr(tmp_path, capsys):
    """`rayclip index` whose measured recall@10 stays below --target-recall publishes the build and
    says so on stderr (stdout keeps the report), exit 0; a build that meets it does not warn."""
    root = tmp_path / "data"
    write_silver(root, "2026-01-01", media_ids(1200), clustered(1200, 32, seed=1))
    # 4 bytes of 4-bit PQ codes for 32 dimensions: far too coarse to rank the 10 nearest exactly.
    args = ["index", "--data-dir", str(root), "--index-type", "IVF16,PQ4x4", "--target-recall", "0.9"]
    assert cli(*args) == 0
    out, err = capsys.readouterr()
    build = json.loads(next(layout.gold_root(root).glob("*/builds/*/build.json")).read_text())
    assert build["recall"]["met"] is False and build["recall"]["recall_at_10"] < 0.9
    warning = f"warning: IVF16,PQ4x4 recall@10 {build['recall']['recall_at_10']:.3f} is below the target 0.9"
    assert re.search(rf"^{re.escape(warning)}; pick another --index-type", err, re.MULTILINE), err
    assert "warning" not in out
    assert cli(*args, "--retrain", "--json") == 0  # stdout is the JSON document; the warning still on stderr
    out, err = capsys.readouterr()
    assert json.loads(out)["recall_target_met"] is False and re.search(
        r"^warning: IVF16,PQ4x4 recall@10 .*; pick", err, re.M
    )
    assert cli("index", "--data-dir", str(root), "--index-type", "flat", "--retrain") == 0
    assert "warning" not in capsys.readouterr().err  # exact search: right by construction, nothing to warn about


def test_api_overview_is_status_json(gold_store, tmp_path, capsys):
    """The status page's /api/overview and `rayclip status --json` are one document: same layers,
    builds, debris and runs, compared whole (nothing volatile: both read the same files, and
    neither reports a time of its own)."""
    from fastapi.testclient import TestClient

    from rayclip.http.app import create_app

    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    killed = layout.downloads_dir(root, "20260101T000000.000000Z-dead00")  # a killed ingest's work folder
    killed.mkdir(parents=True)
    (killed / "input.parquet").write_bytes(b"x" * 10)
    assert cli("status", "--data-dir", str(root), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    overview = TestClient(create_app(root)).get("/api/overview")
    assert overview.status_code == 200
    assert overview.json() == printed
    # Every part is there to compare: both layers' counts, the build, the debris, both stages' runs.
    assert printed["bronze"]["objects"] > 0 and printed["silver"] and printed["gold"][0]["current"]
    assert printed["debris"] == [{"path": str(killed.relative_to(root)), "bytes": 10}]
    assert {run["stage"] for run in printed["runs"]} == {"ingest", "embed"}
    assert_counts_are_the_files(root, printed)


def assert_counts_are_the_files(root, printed: dict) -> None:
    """The document against the files themselves, read here with pyarrow and the filesystem, not
    through the code that wrote the document: a count computed wrong fails here, on both sides."""
    import pyarrow.parquet as pq

    objects = [p for p in layout.objects_dir(root).rglob("*") if p.is_file() and not p.name.startswith(".")]
    manifest = [p for p in layout.manifest_dir(root).glob("*.parquet")]
    bronze = printed["bronze"]
    assert bronze["objects"] == len(objects) and bronze["object_bytes"] == sum(p.stat().st_size for p in objects)
    assert bronze["manifest_rows"] == sum(pq.read_metadata(p).num_rows for p in manifest)
    for entry in printed["silver"]:
        partition = layout.silver_partition(root, entry["model_version"], entry["dt"])
        files = sorted(partition.glob("*.parquet"))
        assert (entry["files"], entry["rows"]) == (len(files), sum(pq.read_metadata(f).num_rows for f in files))
    for build in printed["gold"]:
        current = layout.current_file(root, build["model_version"]).read_text().strip()
        info = json.loads(
            (layout.build_dir(root, build["model_version"], build["build_id"]) / "build.json").read_text()
        )
        assert build["current"] == (build["build_id"] == current) and build["count"] == info["count"]
    records = [*layout.ingest_runs_dir(root).glob("*.json"), *layout.embed_runs_dir(root).glob("*.json")]
    assert sorted(run["run_id"] for run in printed["runs"]) == sorted(p.stem for p in records)
