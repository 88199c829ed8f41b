"""Commands run with every file their processes write recorded, by Debian's strace.

The environment points each place a program writes by default at an empty folder of its own (TMPDIR,
HOME, XDG_*, RAY_TMPDIR, the working folder; Python writes no bytecode cache), and strace records every file
any process of the run (img2dataset's workers, Ray's raylet, GCS and workers included) creates, opens
for writing or renames to, and every folder made. Without strace the commands run unwatched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from helpers import bounded

STRACE = shutil.which("strace")
WATCHED = "openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat"
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
FOLDERS = ("cwd", "tmp", "home", "config", "cache", "data", "state", "ray")


@dataclass(frozen=True)
class Watched:
    """What a watched run wrote: `files` created, opened for writing or renamed to, `folders` made,
    and of those files the ones still there when it ended (absolute paths; None when strace is
    missing); the empty folders it was pointed at (removed since)."""

    output: str
    folders_given: dict[str, Path]
    files: set[str] | None
    folders: set[str] | None
    left: set[str] | None

    @property
    def base(self) -> Path:
        return self.folders_given["cwd"].parent


def run_watched(steps: list[str], traces: Path, timeout: float) -> Watched:
    """`bash -c "STEP && STEP ..."` under strace (when installed) with every default place to write
    pointed at an empty folder; fails the test when a step fails. The folders are removed after."""
    # Short: Ray's Unix sockets live under RAY_TMPDIR, and a socket path is limited to about 100 bytes.
    base = Path(tempfile.mkdtemp(prefix="rc-"))
    given = {name: base / name for name in FOLDERS}
    for folder in given.values():
        folder.mkdir()
    traces.mkdir()
    # --seccomp-bpf: the processes stop at the watched calls only, not at every call (a third of the
    # system time).
    watch = [STRACE, "-f", "-ff", "--seccomp-bpf", "-qq", "-y", "-e", f"trace={WATCHED}", "-o", str(traces / "t")]
    cmd = [*(watch if STRACE else []), "bash", "-c", " && ".join(steps)]
    try:
        done = bounded.run(cmd, timeout, cwd=given["cwd"], env=_pointed_env(given), capture_output=True, text=True)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        if not STRACE:
            return Watched(output, given, None, None, None)
        files, folders = written_paths(traces, given["cwd"])
        return Watched(output, given, files, folders, set(filter(os.path.exists, files)))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _pointed_env(given: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "XDG_"))}
    return env | {
        "TMPDIR": str(given["tmp"]),
        "HOME": str(given["home"]),
        "XDG_CONFIG_HOME": str(given["config"]),
        "XDG_CACHE_HOME": str(given["cache"]),
        "XDG_DATA_HOME": str(given["data"]),
        "XDG_STATE_HOME": str(given["state"]),
        "RAY_TMPDIR": str(given["ray"]),
        # Python reads the bytecode the install compiled and writes none. (A cache moved to an empty
        # folder, $PYTHONPYCACHEPREFIX, made every process of the run compile torch, Ray and the rest
        # from source again: about 10 s of CPU each.)
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }


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


@contextlib.contextmanager
def empty_local_folders(here: Path):
    """This process's working folder, Python's temp folder and the cache folder pointed at empty
    folders under `here` (restored after): what it leaves on the local disk can then be listed."""
    folders = {name: here / name for name in ("cwd", "tmp", "cache")}
    for folder in folders.values():
        folder.mkdir()
    saved = os.getcwd(), tempfile.tempdir, os.environ.get("XDG_CACHE_HOME")
    os.chdir(folders["cwd"])
    tempfile.tempdir = str(folders["tmp"])
    os.environ["XDG_CACHE_HOME"] = str(folders["cache"])
    try:
        yield folders
    finally:
        os.chdir(saved[0])
        tempfile.tempdir = saved[1]
        if saved[2] is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved[2]
