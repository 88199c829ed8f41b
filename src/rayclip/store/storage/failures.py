"""When an object store still refuses after its clients' retries (retries.py): one line naming the
object, the status and the attempts (StoreError), in this process or raised in a Ray task.

botocore's retries end when an answer's headers arrive, so a body that breaks off after them (the
connection dropped before its Content-Length) is read again here (`whole`, `WholeReads`), up to the
same attempts.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from ...errors import UserError
from .locations import Location, is_local, uri
from .retries import S3_MAX_ATTEMPTS_ENV, max_attempts

CUT_BACKOFF_S = 0.1  # before the first read again of an answer cut short; doubled each time, to 5 s

T = TypeVar("T")


class StoreError(UserError):
    """The object store refused after every retry, or gave back a committed object the wrong size."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


class ShortReadError(StoreError):
    """A committed object is not what its commit recorded: another size, empty, or not whole."""


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


def store_call(fn):
    """`fn(loc, …)` with its object-store failures as one StoreError line (on_store)."""

    @functools.wraps(fn)
    def call(loc, *args, **kwargs):
        with on_store(loc):
            return fn(loc, *args, **kwargs)

    return call


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


def gave_up(exc: BaseException) -> StoreError | None:
    """The innermost StoreError in an exception's chain (raised in a Ray task, wrapped by Ray), if any.
    Its own line only: Ray Data adds lines of its own (its retry count) to a UDF's error message."""
    found = [e for e in _chain(exc) if isinstance(e, StoreError)]
    return StoreError(str(found[-1].args[0]).splitlines()[0]) if found else None


def whole(loc: Location, read: Callable[[], T]) -> T:
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


class WholeReads:
    """An object store's open file whose reads are made again when the answer breaks off (`whole`):
    a failed fetch leaves fsspec's file where it was, so the read is simply asked again."""

    def __init__(self, loc: Location, f: BinaryIO) -> None:
        self._loc, self._f = loc, f

    def read(self, size: int = -1) -> bytes:
        return whole(self._loc, lambda: self._f.read(size))

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> WholeReads:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """An exception and its causes, through Ray's wrapping (a task's error keeps its own as .cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)
        exc = (cause if isinstance(cause, BaseException) else None) or exc.__cause__ or exc.__context__


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


def _from_store(exc: BaseException) -> bool:
    """Whether the store (or the way to it) failed: the S3 clients' own errors (s3fs's OSErrors carry
    botocore's as their cause), pyarrow's "AWS Error …"; not bytes that fail to parse."""
    for cause in _chain(exc):
        if type(cause).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp"):
            return True
        if isinstance(cause, OSError) and "AWS Error" in str(cause):
            return True
    return False
