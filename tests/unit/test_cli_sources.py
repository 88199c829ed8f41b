"""docs/shards.md: ingest takes exactly one source, and anything else is a one-line error (no
argparse usage block before it)."""

from __future__ import annotations

import pytest
from helpers.stores import cli


@pytest.mark.parametrize(
    "sources, got",
    [
        (["--metadata", "m.parquet", "--folder", "pictures"], "2"),
        (["--webdataset", "a.tar", "--img2dataset-output", "out"], "2"),
        ([], "none"),
    ],
)
def test_ingest_takes_exactly_one_source_else_one_line(tmp_path, capsys, sources, got):
    assert cli("ingest", "--data-dir", str(tmp_path / "data"), *sources) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "rayclip ingest: error: give exactly one source of --metadata --folder --webdataset "
        f"--img2dataset-output; got {got}\n"
    )
    assert not (tmp_path / "data").exists()  # refused before anything is written
