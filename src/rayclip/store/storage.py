"""Where bytes live: the data root is a local folder or an object-store prefix, and this is the one
module that reads, writes, lists or deletes under it. No other module touches a filesystem API.

A location is a `pathlib.Path` (a local data root) or a `upath.UPath` (`s3://bucket/prefix`,
`gs://…`, `memory://…`, anything fsspec resolves). Both join with `/` like paths, so layout.py
builds locations the same way for either. Endpoint and credentials of an object store come from its
standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …), read by s3fs and pyarrow alike.

Writes are all-or-nothing on both kinds. A local file is written under a hidden temporary name and
renamed. An object store has no rename, but a PUT is atomic: the object appears whole when the
upload completes, never in part (a killed multipart upload is never completed). So every writer here
finishes its bytes before the single PUT, and a commit on an object store is an object written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from upath import UPath

DATA_DIR_ENV = "RAYCLIP_DATA_DIR"
LEASE_NAME = ".lease"
LEASE_BEAT_S = 30.0  # how often a live run on an object store rewrites its lease
LEASE_STALE_S = 180.0  # a lease older than this belonged to a run that died

CHUNK_BYTES = 1 << 20  # what a streamed read or copy moves at a time

Location = Path | UPath


def data_root(data_dir: str | os.PathLike | None = None) -> Location:
    """`--data-dir`, else `$RAYCLIP_DATA_DIR`, else `./data`: a URL (s3://…) or a local path."""
    given = str(data_dir or os.environ.get(DATA_DIR_ENV) or "data")
    if given.startswith("file://"):
        return Path(given.removeprefix("file://")).absolute()
    if "://" in given:
        # No listings cache: another process's commits (a manifest part, CURRENT, a finished shard)
        # must show in the next listing, not after the cache expires.
        return UPath(given.rstrip("/"), use_listings_cache=False)
    return Path(given).absolute()


def location(written: str | os.PathLike) -> Location:
    """A location written out by `uri` (a run record, a Ray task's argument) read back."""
    return data_root(written)


def is_local(loc: Location) -> bool:
    return not isinstance(loc, UPath)


def uri(loc: Location) -> str:
    """The location as a string other libraries take: a local path, or scheme://bucket/key."""
    return str(loc)


def arrow(loc: Location):
    """(pyarrow FileSystem, path in it): what pyarrow.parquet and Ray Data take as `filesystem=`."""
    import pyarrow.fs as pafs

    if is_local(loc):
        return pafs.LocalFileSystem(), str(loc)
    if loc.protocol in ("s3", "s3a", "gs", "gcs"):
        return pafs.FileSystem.from_uri(str(loc))  # pyarrow's own client: same environment, faster
    return pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs)), loc.path


# reading
def exists(loc: Location) -> bool:
    return loc.exists()


def is_dir(loc: Location) -> bool:
    return loc.is_dir()


def read_bytes(loc: Location) -> bytes:
    return loc.read_bytes()


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def read_json(loc: Location) -> dict:
    return json.loads(read_bytes(loc))


def open_input(loc: Location) -> BinaryIO:
    """A readable, seekable binary file (for streaming out or for pyarrow's readers)."""
    return loc.open("rb")


def glob(loc: Location, pattern: str) -> list[Location]:
    """Locations under `loc` matching `pattern` (pathlib glob syntax), sorted."""
    if not exists(loc):
        return []
    return sorted(loc.glob(pattern), key=str)


def children(loc: Location) -> list[Location]:
    return glob(loc, "*")


def size(loc: Location) -> int:
    return loc.stat().st_size


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


def cache_home() -> Path:
    """This machine's cache of copies from object stores: $XDG_CACHE_HOME/rayclip, else ~/.cache/rayclip."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayclip"


def cached(loc: Location, copy: Path) -> Location:
    """`loc` itself when it is local; else the local file `copy` of it, downloaded on first use in
    chunks and renamed into place whole (a killed download leaves no partial copy). Only for objects
    that never change once written (a committed build's files): a copy is never checked again."""
    if is_local(loc):
        return loc
    if not copy.is_file():
        with open_input(loc) as source, open_output(copy) as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES)
    return copy


def resolved_url(loc: Location) -> str:
    """Where the bytes of `loc` really are, as a URL: a local link is followed to its target (file:///…)."""
    return loc.resolve().as_uri() if is_local(loc) else uri(loc)


# writing
def write_atomic(loc: Location, data: bytes | str) -> None:
    """Write the whole of `data`; readers see the old content (or nothing) until it is complete."""
    with open_output(loc) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(loc: Location, obj: dict) -> None:
    write_atomic(loc, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def open_output(loc: Location) -> Iterator[BinaryIO]:
    """A binary file to write `loc` through (pq.write_table, faiss bytes, …), committed whole when the
    block ends without an error; when it raises, nothing is left under `loc`."""
    if not is_local(loc):
        buffer = io.BytesIO()
        yield buffer
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


def move(source: Location, target: Location) -> None:
    """Give a finished file a new name, for files no reader waits on (a run's log): a rename
    locally; on an object store a copy and a delete, since there is no rename."""
    if is_local(source):
        os.replace(source, target)
    else:
        source.fs.mv(source.path, target.path)


def put_if_absent(loc: Location, data: bytes) -> bool:
    """Store content-addressed bytes unless they are there already; True when this call stored them.

    Only for keys derived from the bytes (a sha256): two writers racing past the check write the same
    bytes, so the race is harmless and no conditional PUT is needed.
    """
    if exists(loc):
        return False
    write_atomic(loc, data)
    return True


def delete(loc: Location) -> None:
    """Remove a file, or a folder and everything under it; gone already is fine."""
    if is_local(loc):
        if loc.is_dir():
            shutil.rmtree(loc, ignore_errors=True)
        else:
            loc.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        loc.fs.rm(loc.path, recursive=True)


# leases: which work folders belong to a live run
@contextlib.contextmanager
def working(folder: Location, keep: bool = False) -> Iterator[Location]:
    """Mark a run's work folder live while the block runs, and remove what is left of it after.

    Local: an exclusive flock on the folder, which the kernel drops when the process dies, even by
    kill -9. Object store: a lease object rewritten every LEASE_BEAT_S; a run that died stops
    rewriting it, and after LEASE_STALE_S its folder is debris. With `keep` the folder is the
    run's product (a gold build, committed by a file inside it): a block that ends without an error
    leaves it in place and only the lease goes.
    """
    if is_local(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        except BaseException:
            keep = False  # a product that failed half-way is debris like any work folder
            raise
        finally:
            if not keep:
                delete(folder)
            os.close(fd)
        return
    lease, stop = folder / LEASE_NAME, threading.Event()

    def beat() -> None:
        while not stop.wait(LEASE_BEAT_S):
            with contextlib.suppress(OSError):
                write_atomic(lease, str(time.time()))

    write_atomic(lease, str(time.time()))
    beater = threading.Thread(target=beat, name="rayclip-lease", daemon=True)
    beater.start()
    try:
        yield folder
    except BaseException:
        keep = False
        raise
    finally:
        stop.set()
        beater.join()
        delete(lease if keep else folder)


@contextlib.contextmanager
def unless_held(folder: Location) -> Iterator[bool]:
    """True when no live run holds `folder` (and, locally, keeps it that way inside the block)."""
    if not is_local(folder):
        lease = folder / LEASE_NAME
        yield not exists(lease) or time.time() - mtime(lease) > LEASE_STALE_S
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # gone meanwhile
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)
