"""The loopback image site the ingest tests download from: generated JPEGs plus the bad bodies an
ingest must count and skip, served by a threaded http.server on 127.0.0.1 that counts its GETs and
answers /slow* paths late."""

from __future__ import annotations

import contextlib
import functools
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from helpers import loopback
from rayclip import synthetic

GOOD_IMAGES = 24
SLOW_SECONDS = 8


@dataclass(frozen=True)
class Site:
    """The `site` fixture: its files, its address, the generated images' table and its GET counter."""

    folder: Path
    base: str  # http://127.0.0.1:PORT
    images: pa.Table  # filename, caption of the GOOD_IMAGES generated JPEGs
    requests: Counter  # GETs per path


def huge_png_header(side: int = 60_000) -> bytes:
    """A valid PNG start that claims side x side pixels: decoding it would need gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


class SiteHandler(synthetic._QuietHandler):
    requests: Counter = Counter()  # GETs per path, for the tests that assert what was (not) fetched

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests[self.path] += 1
        if self.path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    with loopback.serving(functools.partial(SiteHandler, directory=str(folder)), quiet_departures=True) as server:
        yield loopback.url(server)


@dataclass(frozen=True)
class HeldOut:
    """A held-out set served on loopback, and the (empty) data root a test ingests it into."""

    metadata: Path  # LAION-style Parquet: the images' URLs on the loopback site, and their captions
    root: Path


@contextlib.contextmanager
def held_out_site(folder: Path, count: int, seed: int) -> Iterator[HeldOut]:
    """`count` captioned JPEGs (a seed training never used) served on loopback."""
    images = synthetic.write_images(folder / "site", count, seed=seed)
    with synthetic.serve_folder(folder / "site") as base:
        yield HeldOut(synthetic.write_metadata(images, base, folder / "meta.parquet"), folder / "data")
