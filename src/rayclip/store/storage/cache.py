"""This machine's local copies of objects that never change once written (a committed build's
files), so FAISS can read or map them by name."""

from __future__ import annotations

import os
from pathlib import Path

from . import files
from .failures import ShortReadError, on_store
from .locations import Location, is_local, uri


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
        with files.open_input(loc, size) as source, files.open_output(copy) as target:
            with on_store(loc):
                copied = files.copy(source, target)
            expected = files.file_size(source)
            if not copied or copied != expected:
                raise ShortReadError(f"{uri(loc)} read back as {copied} bytes; the store says it holds {expected}")
    return copy
