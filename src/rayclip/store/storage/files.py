"""Reading, listing and writing files and objects, all-or-nothing on both kinds of location.

A local file is written under a hidden temporary name and renamed. An object store has no rename,
but a PUT is atomic: the object appears whole when the upload completes, never in part (a killed
multipart upload is never completed). So every writer here finishes its bytes before the single
PUT, and a commit on an object store is an object written last. A read of a committed object whose
size is recorded checks the bytes it got against it (`read_bytes(size=)`), so a short or empty
answer is never taken for data.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ...errors import UserError
from .failures import ShortReadError, StoreError, WholeReads, on_store, store_call
from .locations import Location, is_local, uri

VERIFY_ATTEMPTS = 3  # reads of a committed object that came back the wrong size, before giving up
CHUNK_BYTES = 1 << 20  # what a streamed read or copy moves at a time


# ---------------------------------------------------------------- reading


@store_call
def exists(loc: Location) -> bool:
    return loc.exists()


@store_call
def is_dir(loc: Location) -> bool:
    return loc.is_dir()


def read_bytes(loc: Location, size: int | None = None) -> bytes:
    """The whole file or object. With `size` (what its commit recorded) the bytes are checked against
    it: a short or empty answer is read again, then refused with one clear line, never returned."""
    for attempt in range(VERIFY_ATTEMPTS if size is not None else 1):
        with open_input(loc) as f, on_store(loc):
            data = f.read()
        if size is None or len(data) == size:
            return data
        _forget(loc)
        time.sleep(0.2 * 2**attempt)
    raise StoreError(
        f"{uri(loc)} read back as {len(data)} bytes {VERIFY_ATTEMPTS} times; its commit recorded {size} bytes"
    )


def _forget(loc: Location) -> None:
    """Drop what the client remembers of `loc` (sizes it was told), so the next read asks again."""
    if not is_local(loc):
        loc.fs.invalidate_cache(loc.path)


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def read_json(loc: Location) -> dict:
    """A JSON record (commit record, run record, build.json): one that is empty or cut is refused
    naming the object, never parsed into something else."""
    data = read_bytes(loc)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ShortReadError(f"{uri(loc)} is not a whole JSON record ({len(data)} bytes): {exc}") from None


@store_call
def open_input(loc: Location, size: int | None = None) -> BinaryIO:
    """A readable, seekable binary file (for streaming out or for pyarrow's readers). With `size` (what
    its commit recorded), a file the store reports at another size is refused (see read_bytes)."""
    for attempt in range(VERIFY_ATTEMPTS if size is not None else 1):
        f = loc.open("rb")
        got = file_size(f)
        if size is None or got == size:
            return f if is_local(loc) else WholeReads(loc, f)
        f.close()
        _forget(loc)
        time.sleep(0.2 * 2**attempt)
    raise ShortReadError(
        f"{uri(loc)} has {got} bytes by the store's account {VERIFY_ATTEMPTS} times; its commit recorded {size} bytes"
    )


def file_size(f) -> int:
    """The size of an open_input file: what the store said of it when opened, or the local file's."""
    known = getattr(f, "size", None)  # fsspec's files: what the store said at open
    return known if isinstance(known, int) else os.fstat(f.fileno()).st_size


# ---------------------------------------------------------------- listing


GLOB_CHARS = "*?["  # what makes a pattern's name a pattern, not the name itself


@store_call
def glob(loc: Location, pattern: str) -> list[Location]:
    """Locations under `loc` matching `pattern` (pathlib glob syntax), sorted."""
    if is_local(loc):
        return sorted(loc.glob(pattern), key=str) if loc.exists() else []
    levels = pattern.split("/")
    if levels[-1] in ("", "**"):
        raise UserError(f"the pattern {pattern!r} must end in a name (a file's or a folder's)")
    while len(levels) > 1 and not any(c in levels[0] for c in GLOB_CHARS):
        loc = loc / levels.pop(0)  # a folder named outright: the listing starts there
    return sorted((loc.joinpath(*name.split("/")) for name in _listed(loc, levels)), key=str)


def _listed(loc: Location, levels: list[str]) -> list[str]:
    """The names (relative to `loc`) under an object-store prefix that match a pattern's `levels`,
    from one listing: a LIST with a delimiter for a pattern of one level, else one paged LIST of
    every key below (with the folders they imply). fsspec's own glob asks about the prefix first (a
    HEAD and a LIST), and lists a folder at a time: 6 or more requests for a folder's children."""
    base = loc.path.rstrip("/")
    try:
        if len(levels) > 1:
            names = loc.fs.find(base, withdirs=True, detail=False)
        else:
            names = loc.fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    # A key ending in "/" (a folder marker some tools write) is the folder it names, listed once.
    found = {name.removeprefix(base).strip("/") for name in names if name.startswith(f"{base}/")}
    return [name for name in found if name and _matches(levels, name.split("/"))]


def _matches(levels: list[str], parts: list[str]) -> bool:
    """Whether a name's parts match a pattern's levels as pathlib's glob matches them: fnmatch name
    by name (case-sensitive), `**` standing for any number of folders."""
    if not levels:
        return not parts
    if levels[0] == "**":
        return any(_matches(levels[1:], parts[skipped:]) for skipped in range(len(parts)))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], levels[0]) and _matches(levels[1:], parts[1:])


def children(loc: Location) -> list[Location]:
    return glob(loc, "*")


@store_call
def size(loc: Location) -> int:
    return loc.stat().st_size


@store_call
def mtime(loc: Location) -> float:
    """Seconds since the epoch when the file or object was last written."""
    if is_local(loc):
        return loc.stat().st_mtime
    return loc.fs.modified(loc.path).timestamp()


def tree_size(loc: Location) -> int:
    """Bytes of a file, or of everything under a folder."""
    if not is_dir(loc):
        return size(loc)
    return sum(size(p) for p in loc.rglob("*") if not is_dir(p))


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def open_output(loc: Location) -> Iterator[BinaryIO]:
    """A binary file to write `loc` through (pq.write_table, faiss bytes, …), committed whole when the
    block ends without an error; when it raises, nothing is left under `loc`."""
    if not is_local(loc):
        buffer = io.BytesIO()
        yield buffer
        with on_store(loc):
            loc.write_bytes(buffer.getvalue())  # one PUT of complete bytes
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=loc.parent, prefix=f".{loc.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(loc: Location, data: bytes | str) -> None:
    """Write the whole of `data`; readers see the old content (or nothing) until it is complete."""
    with open_output(loc) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(loc: Location, obj: dict) -> None:
    write_atomic(loc, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def put_if_absent(loc: Location, data: bytes) -> bool:
    """Store content-addressed bytes unless they are there already; True when this call stored them.

    Only for keys derived from the bytes (a sha256): two writers racing past the check write the same
    bytes, so the race is harmless and no conditional PUT is needed.
    """
    if exists(loc):
        return False
    write_atomic(loc, data)
    return True


@contextlib.contextmanager
def open_append(loc: Location) -> Iterator[BinaryIO]:
    """A file with a real descriptor (other processes can write to it: a run's log) whose bytes are
    added to `loc`: a local file grows as it is written; for an object store the bytes are kept in
    memory (a memfd, not the local disk) and the object rewritten with them at the end."""
    if is_local(loc):
        loc.parent.mkdir(parents=True, exist_ok=True)
        with open(loc, "ab") as f:
            yield f
        return
    with os.fdopen(os.memfd_create("rayclip-log"), "w+b") as f:
        yield f
        f.flush()
        f.seek(0)
        added = f.read()
    if added:
        write_atomic(loc, (read_bytes(loc) if exists(loc) else b"") + added)


def upload(local: Path, loc: Location) -> None:
    """Copy a finished local file (FAISS wrote it by name) to `loc`, committed whole."""
    with open(local, "rb") as source, open_output(loc) as target:
        copy(source, target)


def copy(source: BinaryIO, target: BinaryIO) -> int:
    """Every byte of `source` into `target`, CHUNK_BYTES at a time; how many."""
    copied = 0
    while chunk := source.read(CHUNK_BYTES):
        target.write(chunk)
        copied += len(chunk)
    return copied


@store_call
def move(source: Location, target: Location) -> None:
    """Give a finished file a new name, for files no reader waits on (a run's log): a rename
    locally; on an object store a copy and a delete, since there is no rename."""
    if is_local(source):
        os.replace(source, target)
    else:
        source.fs.mv(source.path, target.path)


def delete(loc: Location) -> None:
    """Remove a file, or a folder and everything under it; gone already is fine."""
    if is_local(loc):
        if loc.is_dir():
            shutil.rmtree(loc, ignore_errors=True)
        else:
            loc.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError), on_store(loc):
        loc.fs.rm(loc.path, recursive=True)


# ---------------------------------------------------------------- local scratch


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A local temporary folder, removed with everything in it when the block ends (a removal that
    fails leaves it behind rather than fail the work the block did)."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as folder:
        yield Path(folder)


def link(target: Path, link_path: Path) -> None:
    """A local symbolic link to `target` (an absolute link: the folder holding it may move)."""
    os.symlink(target.absolute(), link_path)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """File descriptor 1 sent to /dev/null inside the block: native code that prints (FAISS's C++)
    must not mix into a command's --json output."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
