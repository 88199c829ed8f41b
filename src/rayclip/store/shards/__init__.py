"""Shard formats: what img2dataset writes (webdataset tars, `files` folders, parquet) and WebDataset's
tars, read in by ingest (`read.py`) and written out by export (`write.py`). The facts both sides
follow are here, once.

img2dataset's layout: shard i is `{i:05d}`; the j-th sample of a shard of `per_shard` samples has
the key `i * 10**ceil(log10(per_shard)) + j`, zero-padded (000000000, 000000001, …, 000010000):
- webdataset: `00000.tar` of `{key}.{ext}`, `{key}.txt`, `{key}.json`, then `00000.parquet`;
- parquet: `00000.parquet`, the metadata and the bytes (column `jpg` whatever the format);
- files: `00000/{key}.{ext}`, `.txt`, `.json`, then `00000.parquet`.
The per-shard `.parquet` beside a tar or a folder holds every sample's metadata, with img2dataset's
`key`, `status` ("success" or not) and `error_message` first. WebDataset groups a tar's members
into samples by their name up to the first dot of the file name.
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from ...errors import DECODE_ERROR, MISSING_URL
from ..catalog import Refused
from ..storage import Location

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 00000.tar
# img2dataset's parquet output names its bytes column by its encode_format (ours on export: jpg,
# whatever the bytes are; with disable_all_reencoding they are the originals).
BYTES_COLUMNS = ("jpg", "png", "webp")
BYTES_COLUMN = BYTES_COLUMNS[0]
STATUS_COLUMNS = ("key", "status", "error_message")  # img2dataset's, first in a shard's metadata
SUCCESS = "success"
# A member (or a folder's file) with one of these extensions is a sample's image.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Why a sample of a shard never reached the image check.
NO_IMAGE = Refused("no image member")  # a sample (files sharing a key) without an image file
TRUNCATED = Refused("truncated tar")  # a tar cut short: the samples before the cut are kept, this counts the cut


@dataclasses.dataclass
class Sample:
    """One image on its way in: its bytes (or the file that holds them), and what its metadata said."""

    url: str
    caption: str
    data: bytes | None = None  # the bytes, as a shard or a download holds them
    file: Location | None = None  # a folder's file, read when its turn comes
    expected_sha256: str | None = None  # the hash its metadata claims, checked against ours


def shard_name(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}"


def key_digits(per_shard: int) -> int:
    """Digits of a sample's place in its shard (img2dataset's oom_sample_per_shard)."""
    return math.ceil(math.log10(per_shard))


def sample_key(shard: int, index: int, digits: int) -> str:
    """The key of the index-th sample of a shard whose samples take `digits` digits."""
    return f"{shard * 10**digits + index:0{digits + SHARD_DIGITS}d}"


def metadata_schema(columns: list[pa.Field]) -> pa.Schema:
    """A shard's metadata: img2dataset's key, status and error_message, the columns (times as ISO text),
    then the sample's format and size_bytes unless among them."""
    fields = [pa.field(name, pa.string()) for name in STATUS_COLUMNS]
    fields += [pa.field(f.name, pa.string() if pa.types.is_timestamp(f.type) else f.type) for f in columns]
    names = {f.name for f in columns}
    sample = [pa.field(n, t) for n, t in (("format", pa.string()), ("size_bytes", pa.int64())) if n not in names]
    return pa.schema(fields + sample)


def failure_reason(message: str | None) -> str:
    """Group img2dataset's error messages into a few reasons a user can act on."""
    text = (message or "unknown error").strip()
    lower = text.lower()
    if lower.startswith("http error"):
        return "HTTP " + text.split()[2].rstrip(":")
    if "timed out" in lower or "timeout" in lower:
        return "timeout"
    if "unknown url type" in lower:
        return MISSING_URL
    if "decod" in lower or "assertion" in lower or "image" in lower:
        return DECODE_ERROR
    if "refused" in lower or "urlopen error" in lower or "connection" in lower:
        return "connection error"
    return text[:80]
