"""What a location is: a `pathlib.Path` (a local data root) or a `upath.UPath` (`s3://bucket/prefix`,
`gs://…`, `memory://…`, anything fsspec resolves). Both join with `/` like paths, so layout.py builds
locations the same way for either. Endpoint and credentials of an object store come from its standard
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …), read by s3fs and pyarrow alike; the clients
built here retry as retries.py says."""

from __future__ import annotations

import os
from pathlib import Path

from upath import UPath

from .retries import arrow_s3, fsspec_options, max_attempts

DATA_DIR_ENV = "RAYCLIP_DATA_DIR"

Location = Path | UPath


def resolved(root: Location | str | os.PathLike | None) -> Location:
    """A data root as given to a library entry point: a Location data_root made is used as it is
    (resolved once, at the edge), anything else is resolved here. A UPath a caller built itself is
    made again: its client would cache listings and miss another process's commits."""
    made_here = isinstance(root, UPath) and root.storage_options.get("use_listings_cache") is False
    resolved_already = made_here or (isinstance(root, Path) and not isinstance(root, UPath) and root.is_absolute())
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
        root = UPath(given.rstrip("/"), use_listings_cache=False, **fsspec_options(protocol))
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


def resolved_url(loc: Location) -> str:
    """Where the bytes of `loc` really are, as a URL: a local link is followed to its target (file:///…)."""
    return loc.resolve().as_uri() if is_local(loc) else uri(loc)


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
        return arrow_s3(max_attempts(), options), path
    if loc.protocol in ("gs", "gcs"):
        return pafs.FileSystem.from_uri(str(loc))  # pyarrow's own client: same environment, faster
    return pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs)), loc.path
