"""Where bytes live: the data root is a local folder or an object-store prefix, and this package is
the one place that reads, writes, lists or deletes under it. No other module touches a filesystem API.

Callers use `storage.<name>`; each concern is a module of its own:
- locations.py: what a location is (a local Path or a UPath), the data root, pyarrow's filesystem;
- retries.py: how often every S3 client rayclip builds (or a process it starts builds) retries;
- failures.py: the store giving up as one StoreError line, and answers cut short read again;
- files.py: reads (checked against a recorded size), listing, whole writes, deletes;
- cache.py: this machine's local copies of objects that never change;
- leases.py: the work folder a live run holds (a flock locally, a lease object on an object store).
"""

from .cache import cache_home, cached
from .failures import ShortReadError, StoreError, on_store, refusals_surfaced
from .files import (
    CHUNK_BYTES,
    GLOB_CHARS,
    children,
    delete,
    exists,
    file_size,
    glob,
    is_dir,
    link,
    move,
    mtime,
    open_append,
    open_input,
    open_output,
    put_if_absent,
    quiet_stdout,
    read_bytes,
    read_json,
    read_text,
    scratch_folder,
    size,
    tree_size,
    upload,
    write_atomic,
    write_json_atomic,
)
from .leases import LEASE_NAME, unless_held, working
from .locations import DATA_DIR_ENV, Location, arrow, data_root, is_local, location, resolved, resolved_url, uri
from .retries import S3_MAX_ATTEMPTS_ENV, retry_env

__all__ = [
    "CHUNK_BYTES",
    "DATA_DIR_ENV",
    "GLOB_CHARS",
    "LEASE_NAME",
    "S3_MAX_ATTEMPTS_ENV",
    "Location",
    "ShortReadError",
    "StoreError",
    "arrow",
    "cache_home",
    "cached",
    "children",
    "data_root",
    "delete",
    "exists",
    "file_size",
    "glob",
    "is_dir",
    "is_local",
    "link",
    "location",
    "move",
    "mtime",
    "on_store",
    "open_append",
    "open_input",
    "open_output",
    "put_if_absent",
    "quiet_stdout",
    "read_bytes",
    "read_json",
    "read_text",
    "refusals_surfaced",
    "resolved",
    "resolved_url",
    "retry_env",
    "scratch_folder",
    "size",
    "tree_size",
    "unless_held",
    "upload",
    "uri",
    "working",
    "write_atomic",
    "write_json_atomic",
]
