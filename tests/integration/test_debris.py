"""Temporaries of writers killed mid-write: a local file is written under a hidden `.<name>.<random>.tmp`
and renamed (storage.open_output). One left behind is never read; once older than
debris.TEMP_GRACE_S it is listed by `rayclip status` and removed by `rayclip gc`, and not before
(a writer may still be finishing it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from helpers.stores import cli

from rayclip.store import catalog, debris, layout

# Opens a manifest part and a run record through the storage writer, writes half of each, and
# dies by SIGKILL before either is renamed: what a kill -9 in the middle of a commit leaves.
KILLED_WRITER = """
import os, signal, sys
from rayclip.store import layout, storage
root, run_id = storage.data_root(sys.argv[1]), sys.argv[2]
with storage.open_output(layout.manifest_part(root, run_id, 0, 4096)) as part:
    with storage.open_output(layout.run_record(layout.ingest_runs_dir(root), run_id)) as record:
        part.write(b"PAR1 half a row group")
        record.write(b'{"run_id": "' + run_id.encode())
        part.flush(), record.flush()
        os.kill(os.getpid(), signal.SIGKILL)
"""


def listed_debris(root, capsys) -> list[str]:
    """What `rayclip status --json` lists as debris."""
    capsys.readouterr()
    assert cli("status", "--data-dir", str(root), "--json") == 0
    return [d["path"] for d in json.loads(capsys.readouterr().out)["debris"]]


def test_a_killed_writers_temporaries_are_unseen_and_swept_once_stale(ingested, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    before = (catalog.read_manifest(root), catalog.run_records(root))

    run_id = layout.new_run_id()
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root), run_id], env=os.environ)
    assert killed.returncode == -signal.SIGKILL
    [part_temp] = layout.manifest_dir(root).glob(f".{layout.manifest_part(root, run_id, 0, 4096).name}.*.tmp")
    [record_temp] = layout.ingest_runs_dir(root).glob(f".{run_id}.json.*.tmp")

    # No reader sees either: the manifest and the run records read as before.
    assert catalog.read_manifest(root).equals(before[0]) and catalog.run_records(root) == before[1]

    # Fresh, either may belong to a writer still at work: not debris.
    assert listed_debris(root, capsys) == []
    old = part_temp.stat().st_mtime - debris.TEMP_GRACE_S - 60
    os.utime(part_temp, (old, old))  # the killed writer's part, from long ago
    assert listed_debris(root, capsys) == [str(part_temp.relative_to(root))]

    capsys.readouterr()
    assert cli("gc", "--data-dir", str(root)) == 0
    assert f"removed {part_temp.relative_to(root)}" in capsys.readouterr().out
    assert not part_temp.exists() and record_temp.exists()  # the fresh one is left alone
    assert listed_debris(root, capsys) == []
    assert catalog.read_manifest(root).equals(before[0]) and catalog.run_records(root) == before[1]
