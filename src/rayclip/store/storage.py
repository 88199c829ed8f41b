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

An object store throttles (503 SlowDown), fails inside (500) and drops connections. Every client
rayclip builds for one retries each request up to `max_attempts()` times with backoff ($RAYCLIP_S3_
MAX_ATTEMPTS, default DEFAULT_S3_MAX_ATTEMPTS): s3fs/botocore here, pyarrow's S3 client (also in
Ray Data's read and write tasks), and, through AWS_MAX_ATTEMPTS/AWS_RETRY_MODE (`retry_env`), every
process that builds its own (img2dataset's, Ray's workers). When the store still refuses, the
error is one line naming the object, the status and the attempts (StoreError). botocore's
retries end when an answer's headers arrive, so a body that breaks off after them (the connection
dropped before its Content-Length) is read again here (`_whole`), up to the same attempts. A read of a
committed object whose size is recorded checks the bytes it got against it (`read_bytes(size=)`),
so a short or empty answer is never taken for data.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from upath import UPath

from ..errors import UserError

DATA_DIR_ENV = "RAYCLIP_DATA_DIR"
S3_MAX_ATTEMPTS_ENV = "RAYCLIP_S3_MAX_ATTEMPTS"
DEFAULT_S3_MAX_ATTEMPTS = 10  # attempts per request: a 503 storm of about a minute is ridden out
DEFAULT_RETRY_MODE = "standard"  # botocore's and the AWS C++ SDK's own; $AWS_RETRY_MODE=adaptive also limits the rate
VERIFY_ATTEMPTS = 3  # reads of a committed object that came back the wrong size, before giving up
LEASE_NAME = ".lease"
LEASE_BEAT_S = 30.0  # how often a live run on an object store rewrites its lease
LEASE_STALE_S = 180.0  # a lease older than this belonged to a run that died

CHUNK_BYTES = 1 << 20  # what a streamed read or copy moves at a time
CUT_BACKOFF_S = 0.1  # before the first read again of an answer cut short; doubled each time, to 5 s

T = TypeVar("T")

Location = Path | UPath


class StoreError(UserError):
    """The object store refused after every retry, or gave back a committed object the wrong size."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


class ShortReadError(StoreError):
    """A committed object is not what its commit recorded: another size, empty, or not whole."""


# retries
def max_attempts() -> int:
    """Attempts per object-store request: $RAYCLIP_S3_MAX_ATTEMPTS, else DEFAULT_S3_MAX_ATTEMPTS."""
    given = os.environ.get(S3_MAX_ATTEMPTS_ENV, "").strip()
    if not given:
        return DEFAULT_S3_MAX_ATTEMPTS
    if not given.isdigit() or int(given) < 1:
        raise UserError(f"${S3_MAX_ATTEMPTS_ENV}={given!r} must be a whole number of attempts, 1 or more")
    return int(given)


def retry_mode() -> str:
    return os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE


def retry_env() -> dict[str, str]:
    """The environment that gives a process's own S3 clients our retries (botocore reads AWS_*;
    rayclip's own clients in Ray's workers read the knob)."""
    attempts = str(max_attempts())
    return {S3_MAX_ATTEMPTS_ENV: attempts, "AWS_MAX_ATTEMPTS": attempts, "AWS_RETRY_MODE": retry_mode()}


def _fsspec_options(protocol: str) -> dict:
    if protocol not in ("s3", "s3a"):
        return {}
    return {"config_kwargs": {"retries": {"total_max_attempts": max_attempts(), "mode": retry_mode()}}}


def resolved(root: Location | str | os.PathLike | None) -> Location:
    """A data root as given to a library entry point: a Location the caller resolved is used as it
    is (resolved once, at the edge), anything else is resolved here (data_root)."""
    resolved_already = isinstance(root, UPath) or (isinstance(root, Path) and root.is_absolute())
    return root if resolved_already else data_root(root)


def data_root(data_dir: str | os.PathLike | None = None) -> Location:
    """`--data-dir`, else `$RAYCLIP_DATA_DIR`, else `./data`: a URL (s3://…) or a local path."""
    given = str(data_dir or os.environ.get(DATA_DIR_ENV) or "data")
    if given.startswith("file://"):
        return Path(given.removeprefix("file://")).absolute()
    if "://" in given:
        # No listings cache: another process's commits (a manifest part, CURRENT, a finished shard)
        # must show in the next listing, not after the cache expires.
        protocol = given.split("://", 1)[0].lower()
        root = UPath(given.rstrip("/"), use_listings_cache=False, **_fsspec_options(protocol))
        if protocol in ("s3", "s3a"):
            # botocore alone retries: s3fs's own loop around it would repeat a SlowDown's whole round of
            # attempts again (its `retries` is an attribute, not an argument).
            root.fs.retries = 1
        return root
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
    if loc.protocol in ("s3", "s3a"):
        # pyarrow's own client (faster than s3fs through FSSpecHandler), as from_uri configures it from
        # the environment (endpoint, the bucket's region), plus our retries.
        found, path = pafs.FileSystem.from_uri(str(loc))
        _, (options,) = found.__reduce__()
        return _arrow_s3(max_attempts(), options), path
    if loc.protocol in ("gs", "gcs"):
        return pafs.FileSystem.from_uri(str(loc))  # pyarrow's own client: same environment, faster
    return pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs)), loc.path


@functools.cache
def _arrow_s3_class():
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3 client with our retries, kept when pickled (Ray Data ships it to its read and
        write tasks; pyarrow's own pickle drops the retry strategy)."""

        def __init__(self, attempts: int, options: dict) -> None:
            super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
            self.attempts, self.options = attempts, options

        def __reduce__(self):
            return _arrow_s3, (self.attempts, self.options)

    return RetryingS3FileSystem


def _arrow_s3(attempts: int, options: dict):
    """pyarrow's S3FileSystem(**options) retrying each request up to `attempts` times."""
    return _arrow_s3_class()(attempts, options)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and its causes, through Ray's wrapping (a task's error keeps its own as .cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)
        exc = (cause if isinstance(cause, BaseException) else None) or exc.__cause__ or exc.__context__


def gave_up(exc: BaseException) -> StoreError | None:
    """The innermost StoreError in an exception's chain (raised in a Ray task, wrapped by Ray), if any.
    Its own line only: Ray Data adds lines of its own (its retry count) to a UDF's error message."""
    found = [e for e in _chain(exc) if isinstance(e, StoreError)]
    return StoreError(str(found[-1].args[0]).splitlines()[0]) if found else None


@contextlib.contextmanager
def refusals_surfaced(root: Location) -> Iterator[None]:
    """Inside: the store giving up in another process (a Ray task's read or write, wrapped in Ray's
    errors) comes out as the one-line StoreError, as it does in this one."""
    try:
        yield
    except Exception as exc:  # a StoreError too: Ray raises its own error as an instance of the cause's class
        found = gave_up(exc)
        if found is not None:
            raise found from None
        if not is_local(root) and _from_store(exc):
            raise _refusal(root, exc) from None
        raise


def _refusal(loc: Location, exc: BaseException, attempts: int | None = None) -> StoreError:
    """One line: the object, what the store answered, and how many attempts were made."""
    status = _cut_short(exc)
    for cause in _chain(exc) if status is None else ():
        response = getattr(cause, "response", None)
        if isinstance(response, dict) and "Error" in response:
            meta = response.get("ResponseMetadata", {})
            code, http = str(response["Error"].get("Code", "")), str(meta.get("HTTPStatusCode", "?"))
            status = http if code in ("", http) else f"{http} {code}"  # a HEAD's error has no body: no code
            attempts = meta.get("RetryAttempts", 0) + 1
            break
    if status is None:
        innermost = [c for c in _chain(exc) if _from_store(c)][-1:] or [exc]
        status = (str(innermost[0]).strip().splitlines() or [type(exc).__name__])[0]
    tried = f"{attempts} attempt{'s' * (attempts != 1)}" if attempts else f"up to {max_attempts()} attempt(s)"
    return StoreError(
        f"the object store gave up on {uri(loc)} after {tried}: {status} (${S3_MAX_ATTEMPTS_ENV} sets the attempts)"
    )


_KEPT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StoreError)


@contextlib.contextmanager
def on_store(loc: Location) -> Iterator[None]:
    """An object-store request's failure, after its retries, as one StoreError line."""
    try:
        yield
    except _KEPT:
        raise
    except Exception as exc:
        if is_local(loc) or not _from_store(exc):
            raise
        raise _refusal(loc, exc) from exc


def _cut_short(exc: BaseException) -> str | None:
    """How the store's answer broke off mid-body, if it did: aiohttp's ClientPayloadError (what s3fs
    reads a body through; its cause, a ContentLengthError, carries aiohttp's parser code 400, which the
    store never sent) or botocore's own check of the length."""
    from aiohttp import ClientPayloadError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    for cause in _chain(exc):
        if isinstance(cause, ClientPayloadError | IncompleteReadError | ResponseStreamingError):
            detail = getattr(cause.__cause__, "message", None) or str(cause)
            return f"the answer broke off before its end ({detail.strip().rstrip('.')})"
    return None


def _whole(loc: Location, read: Callable[[], T]) -> T:
    """read(), again while an object store's answer breaks off mid-body, up to max_attempts() in all;
    then one StoreError line saying so. Other failures are not retried here (botocore did)."""
    attempts = 1 if is_local(loc) else max_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as exc:
            if is_local(loc) or _cut_short(exc) is None:
                raise
            if attempt == attempts:
                raise _refusal(loc, exc, attempts) from exc
        time.sleep(min(5.0, CUT_BACKOFF_S * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


class _WholeReads:
    """An object store's open file whose reads are made again when the answer breaks off (`_whole`):
    a failed fetch leaves fsspec's file where it was, so the read is simply asked again."""

    def __init__(self, loc: Location, f: BinaryIO) -> None:
        self._loc, self._f = loc, f

    def read(self, size: int = -1) -> bytes:
        return _whole(self._loc, lambda: self._f.read(size))

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _WholeReads:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _from_store(exc: BaseException) -> bool:
    """Whether the store (or the way to it) failed: the S3 clients' own errors (s3fs's OSErrors carry
    botocore's as their cause), pyarrow's "AWS Error …"; not bytes that fail to parse."""
    for cause in _chain(exc):
        if type(cause).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
            return True
        if isinstance(cause, OSError) and "AWS Error" in str(cause):
            return True
    return False


def _store_call(fn):
    @functools.wraps(fn)
    def call(loc, *args, **kwargs):
        with on_store(loc):
            return fn(loc, *args, **kwargs)

    return call


# reading
@_store_call
def exists(loc: Location) -> bool:
    return loc.exists()


@_store_call
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


@_store_call
def open_input(loc: Location, size: int | None = None) -> BinaryIO:
    """A readable, seekable binary file (for streaming out or for pyarrow's readers). With `size` (what
    its commit recorded), a file the store reports at another size is refused (see read_bytes)."""
    for attempt in range(VERIFY_ATTEMPTS if size is not None else 1):
        f = loc.open("rb")
        got = file_size(f)
        if size is None or got == size:
            return f if is_local(loc) else _WholeReads(loc, f)
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


@_store_call
def glob(loc: Location, pattern: str) -> list[Location]:
    """Locations under `loc` matching `pattern` (pathlib glob syntax), sorted."""
    if not loc.exists():
        return []
    return sorted(loc.glob(pattern), key=str)


def children(loc: Location) -> list[Location]:
    return glob(loc, "*")


@_store_call
def size(loc: Location) -> int:
    return loc.stat().st_size


@_store_call
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


def cached(loc: Location, copy: Path, size: int | None = None) -> Location:
    """`loc` itself when it is local; else the local file `copy` of it, downloaded on first use in
    chunks and renamed into place whole (a killed download leaves no partial copy). Only for objects
    that never change once written (a committed build's files): a copy is never checked again, so
    one is kept only when it has every byte: `size` when its commit recorded it, else what the store
    says the object holds, and never none."""
    if is_local(loc):
        return loc
    if not copy.is_file():
        with open_input(loc, size) as source, open_output(copy) as target:
            with on_store(loc):
                copied = _copy(source, target)
            expected = file_size(source)
            if not copied or copied != expected:
                raise ShortReadError(f"{uri(loc)} read back as {copied} bytes; the store says it holds {expected}")
    return copy


def _copy(source: BinaryIO, target: BinaryIO) -> int:
    copied = 0
    while chunk := source.read(CHUNK_BYTES):
        target.write(chunk)
        copied += len(chunk)
    return copied


def resolved_url(loc: Location) -> str:
    """Where the bytes of `loc` really are, as a URL: a local link is followed to its target (file:///…)."""
    return loc.resolve().as_uri() if is_local(loc) else uri(loc)


# writing
@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A local temporary folder, removed with everything in it when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def link(target: Path, link_path: Path) -> None:
    """A local symbolic link to `target` (an absolute link: the folder holding it may move)."""
    os.symlink(target.absolute(), link_path)


def write_atomic(loc: Location, data: bytes | str) -> None:
    """Write the whole of `data`; readers see the old content (or nothing) until it is complete."""
    with open_output(loc) as f:
        f.write(data.encode() if isinstance(data, str) else data)


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


def upload(local: Path, loc: Location) -> None:
    """Copy a finished local file (FAISS wrote it by name) to `loc`, committed whole."""
    with open(local, "rb") as source, open_output(loc) as target:
        _copy(source, target)


def write_json_atomic(loc: Location, obj: dict) -> None:
    write_atomic(loc, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


@_store_call
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
    with contextlib.suppress(FileNotFoundError), on_store(loc):
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
            with contextlib.suppress(OSError, StoreError):  # the next beat tries again
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
