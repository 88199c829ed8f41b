"""A pipeline on an object store writes nothing to the local disk, watched while it runs.

`rayclip ingest`, `embed` (starting its own Ray) and `index` run on an S3 data root under strace,
which records every file any of their processes (img2dataset's workers, Ray's raylet, GCS and
workers included) creates, opens for writing or renames to, and every folder made. The environment
points each place a program writes by default at an empty folder of its own (TMPDIR, HOME, XDG_*,
RAY_TMPDIR, Python's bytecode cache, the working folder). Outside them only memory and the kernel's
files may be written: /dev/shm (Ray's object store, the semaphores of img2dataset's worker pool),
/proc (Ray sets its workers' oom_score_adj), device nodes. Inside them files only in Ray's session
folder (RAY_TMPDIR/ray/session_*: logs, sockets, ports), Ray's token ($HOME/.ray/auth_token) and
Python's probe of TMPDIR (removed at once); the rest is empty folders (wandb's, which img2dataset
imports, and torch's compile cache's).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import GOOD_IMAGES

from rayclip.store import catalog, storage

REFERENCE = "clip_rayclip_ref_reference"
WATCHED = "openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat"
# Outside the pointed folders, only memory and devices: /dev/shm is a tmpfs (Ray's object store
# keeps its objects there, Python's multiprocessing its semaphores), the rest are device nodes.
ALLOWED_OUTSIDE = ("/dev/shm/", "/dev/null", "/dev/tty", "/dev/pts/", "/proc/")
PROBE = re.compile(r"[a-z0-9_]{8}")  # tempfile's candidate names
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")

strace = shutil.which("strace")


def written_paths(trace_dir: Path, cwd: Path) -> tuple[set[str], set[str]]:
    """(files, folders): every file a traced process created, opened for writing or renamed to, and
    every folder it made."""
    files, folders = set(), set()
    call = re.compile(r"^(\w+)\((.*)\)\s+=\s+(\d+)(?:<(.*)>)?")
    for trace in trace_dir.iterdir():
        for line in trace.read_text(errors="replace").splitlines():
            match = call.match(line)
            if not match:  # a failed call (= -1), or a signal or exit line
                continue
            name, args, opened = match.group(1), match.group(2), match.group(4)
            paths = re.findall(r'(?:(?:AT_FDCWD|\d+)(?:<([^>]*)>)?, )?"([^"]*)"', args)
            if name in ("openat", "creat"):
                if name == "creat" or any(flag in args for flag in WRITE_FLAGS):
                    files.add(opened or _absolute(*paths[0], cwd))
            elif name.startswith(("rename", "link", "symlink")):
                files.add(_absolute(*paths[-1], cwd))  # the new name
            else:  # mkdir, mkdirat
                folders.add(_absolute(*paths[0], cwd))
    return files, folders


def _absolute(folder: str, path: str, cwd: Path) -> str:
    # strace -y shows the folder of an *at call's descriptor, not a plain mkdir's or rename's working
    # folder: a relative one is taken as the launch folder's. Every file is created by an openat or
    # creat, whose result -y shows as an absolute path, so no file escapes by it.
    return path if path.startswith("/") else str(Path(folder or cwd) / path)


@pytest.mark.slow
@pytest.mark.timeout(900)  # three commands under strace, one starting Ray
@pytest.mark.skipif(strace is None, reason="strace is missing (`make test` installs Debian's strace as root)")
def test_s3_pipeline_writes_nothing_to_local_disk_while_it_runs(s3_root, good_metadata, tmp_path):
    # Short: Ray's Unix sockets live under RAY_TMPDIR, and a socket path is limited to about 100 bytes.
    base = Path(tempfile.mkdtemp(prefix="rc-"))
    folders = {name: base / name for name in ("cwd", "tmp", "home", "config", "cache", "data", "state", "ray", "pyc")}
    for folder in folders.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "XDG_"))}
    env |= {
        "TMPDIR": str(folders["tmp"]),
        "HOME": str(folders["home"]),
        "XDG_CONFIG_HOME": str(folders["config"]),
        "XDG_CACHE_HOME": str(folders["cache"]),
        "XDG_DATA_HOME": str(folders["data"]),
        "XDG_STATE_HOME": str(folders["state"]),
        "RAY_TMPDIR": str(folders["ray"]),
        "PYTHONPYCACHEPREFIX": str(folders["pyc"]),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    url, traces = storage.uri(s3_root), tmp_path / "trace"
    traces.mkdir()
    rayclip = f"{sys.executable} -m rayclip.cli"
    steps = [
        f"{rayclip} ingest --data-dir {url} --metadata {good_metadata} --timeout 3",
        f"{rayclip} embed --data-dir {url} --pretrained reference --actors 1 --batch-size 8",
        f"{rayclip} index --data-dir {url}",
    ]
    cmd = [
        strace,
        "-f",
        "-ff",
        "--seccomp-bpf",  # stops the processes at the watched calls only, not at every call (~3x less system time)
        "-qq",
        "-y",
        "-e",
        f"trace={WATCHED}",
        "-o",
        str(traces / "t"),
        "bash",
        "-c",
    ]
    try:
        watched = subprocess.Popen(
            [*cmd, " && ".join(steps)],
            cwd=folders["cwd"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout kills the tree (Ray's processes too)
        )
        try:
            out = watched.communicate(timeout=800)[0]
        except subprocess.TimeoutExpired:
            os.killpg(watched.pid, signal.SIGKILL)
            watched.communicate(timeout=60)
            raise
        assert watched.returncode == 0, out[-4000:]
        assert catalog.read_manifest(s3_root).num_rows == GOOD_IMAGES + 1  # the run did its work, on S3
        assert catalog.current_build(s3_root, REFERENCE)

        files, made = written_paths(traces, folders["cwd"])
        outside = sorted(
            p for p in files | made if not Path(p).is_relative_to(base) and not p.startswith(ALLOWED_OUTSIDE)
        )
        assert outside == [], outside[:40]
        # Inside, files only in Ray's session folder and Ray's token (an empty folder made is no data).
        ray_files = [p for p in files if Path(p).is_relative_to(folders["ray"])]
        assert any("/session_" in p for p in ray_files)  # Ray's session folder: watched, and there
        # Python's check that TMPDIR is writable (tempfile.gettempdir, once per process): a file named
        # by 8 random letters, written and removed at once.
        probes = [p for p in files if Path(p).parent == folders["tmp"] and PROBE.fullmatch(Path(p).name)]
        assert not any(map(os.path.exists, probes))
        others = sorted(p for p in files if Path(p).is_relative_to(base) and p not in ray_files + probes)
        assert set(others) <= {str(folders["home"] / ".ray" / "auth_token")}, others[:40]
    finally:
        shutil.rmtree(base, ignore_errors=True)
