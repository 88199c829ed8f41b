"""Claims the docs make about the whole tool, each checked where a user would see it."""

from __future__ import annotations

import json
import re
import shutil

from conftest import cli
from silver_helpers import clustered, media_ids, write_silver

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
    shutil.copytree(gold_store[0], root)
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
