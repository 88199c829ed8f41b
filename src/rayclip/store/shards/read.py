"""Reading shards in: WebDataset tars (shard patterns with braces and globs) and img2dataset's
output in any of its formats, as Samples in order, with a refusal (catalog.Refused) for each sample
that cannot be one (img2dataset's failures counted by reason, a member-less sample, a cut tar).

A shard is read when its turn comes, a sample's bytes when the sample's turn comes: memory follows
a sample (a parquet shard's, a batch of rows), never the shard.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator

import pyarrow.parquet as pq

from ...errors import UserError
from .. import storage
from ..catalog import Refused
from ..storage import Location
from . import BYTES_COLUMNS, IMAGE_EXTENSIONS, NO_IMAGE, SUCCESS, TRUNCATED, Sample, failure_reason

# webdataset's shard ranges: {00000..00099} (zero-padded like the first bound) and {a,b} alternatives.
_BRACES = re.compile(r"\{(\d+\.\.\d+|[^{}]*,[^{}]*)\}")
READ_ROWS = 256  # rows of a parquet shard decoded at once

Samples = Iterator[Sample | Refused]
Shard = Callable[[], Samples]  # a shard's samples, read when called


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard spec: `shards/{00000..00099}.tar` (a range, zero-padded as its first bound is)
    and `{a,b}` alternatives, several or nested; other text, globs included, is kept as written."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if span := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        first, last = span.groups()
        choices = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    # Nested braces expand inside out, so an outer alternative can come twice: each name once, in order.
    return list(dict.fromkeys(expanded for choice in choices for expanded in expand_braces(head + choice + tail)))


def shard_locations(pattern: str) -> list[Location]:
    """The shards a pattern names (braces expanded, then globs matched; local or an object store), in order."""
    found: list[Location] = []
    for written in expand_braces(pattern):
        if not any(c in written for c in storage.GLOB_CHARS):
            found.append(storage.location(written))
            continue
        cut = min(written.index(c) for c in storage.GLOB_CHARS if c in written)
        base = written[:cut].rpartition("/")[0]
        found += storage.glob(storage.location(base or "."), written[len(base) + 1 if base else 0 :])
    if not found:
        raise UserError(f"no shards match {pattern}")
    missing = [shard for shard in found if not storage.exists(shard)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(found)} shards {pattern} names do not exist, e.g. {missing[0]}")
    return found


def webdataset_shards(pattern: str) -> list[Shard]:
    """The tars a pattern names, each a shard."""
    return [functools.partial(tar_samples, tar) for tar in shard_locations(pattern)]


def img2dataset_shards(folder: Location) -> list[Shard]:
    """The shards of an img2dataset output folder, whatever its output_format: NNNNN.tar (webdataset),
    NNNNN/ (files) or NNNNN.parquet alone (parquet); beside a tar or a folder, NNNNN.parquet lists
    the rows img2dataset failed on, counted by reason (failure_reason)."""
    children = storage.children(folder)
    names = {child.name for child in children}
    shards = []
    for child in children:
        stem, _, ext = child.name.partition(".")
        sidecar = folder / f"{stem}.parquet"
        if ext == "tar":
            body = functools.partial(tar_samples, child)
        elif not ext and storage.is_dir(child):
            body = functools.partial(_files_samples, child)
        elif ext == "parquet" and {f"{stem}.tar", stem}.isdisjoint(names):
            shards.append(functools.partial(parquet_samples, child, check_hash=False))
            continue
        else:
            continue
        failures = (functools.partial(_failures, sidecar),) if sidecar.name in names else ()
        shards.append(_chained(*failures, body))
    if not shards:
        raise UserError(f"no img2dataset shards (NNNNN.tar, NNNNN/ or NNNNN.parquet) under {folder}")
    return shards


def tar_samples(tar: Location) -> Samples:
    """A plain tar's samples in order, then TRUNCATED if it was cut short (a sample the cut split is dropped)."""
    with storage.open_input(tar) as f:
        pending: list[Sample | Refused] = []  # one sample behind: the last is kept once the tar proves whole
        try:
            with tarfile.open(fileobj=f, mode="r|") as archive:
                files = ((m.name, archive.extractfile(m).read) for m in archive if m.isfile())
                for sample in _grouped(files, storage.uri(tar)):
                    yield from pending
                    pending = [sample]
                # tarfile ends quietly at a header cut short; a whole tar ends with two zero blocks.
                whole = storage.file_size(f) >= archive.offset + 2 * tarfile.BLOCKSIZE
        except (tarfile.ReadError, EOFError):  # cut inside a file: the samples grouped before it are whole
            yield from pending
            yield TRUNCATED
            return
        yield from pending if whole else [TRUNCATED]


def parquet_samples(shard: Location, check_hash: bool) -> Samples:
    """img2dataset's per-shard Parquet: a row it failed on as its reason; a success as a Sample when
    the bytes are in it (its `parquet` format; beside tars and folders the file holds no bytes).
    `check_hash`: img2dataset's `sha256` is of these very bytes (it downloaded them without re-encoding)."""
    with storage.open_input(shard) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        data = next((c for c in BYTES_COLUMNS if c in names), None)
        wanted = ["key", "url", "caption", "txt", "status", "error_message", "sha256", "media_id", data]
        for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=[c for c in wanted if c in names]):
            for row in batch.to_pylist():
                if row.get("status") != SUCCESS:
                    yield Refused(failure_reason(row.get("error_message")))
                elif data is not None:
                    yield Sample(
                        url=row.get("url") or f"{storage.uri(shard)}#{row.get('key')}",
                        caption=row.get("caption") or row.get("txt") or "",
                        data=row[data],
                        expected_sha256=row.get("media_id") or (row.get("sha256") if check_hash else None),
                    )


def _files_samples(folder: Location) -> Samples:
    """img2dataset's `files` format: one folder per shard of key.jpg, key.txt and key.json."""
    files = storage.glob(folder, "*")
    yield from _grouped(((p.name, lambda p=p: storage.read_bytes(p)) for p in files), storage.uri(folder))


def _grouped(files: Iterable[tuple[str, Callable[[], bytes]]], origin: str) -> Samples:
    """webdataset's grouping: consecutive files whose names agree up to the first dot of the file name
    are one sample; each file's bytes are read when its turn comes."""
    key, members = None, {}
    for name, read in files:
        folder, _, file_name = name.rpartition("/")
        stem, _, ext = file_name.partition(".")
        sample = f"{folder}/{stem}" if folder else stem
        if sample != key and members:
            yield _sample(key, members, origin)
            members = {}
        key = sample
        members[ext.lower()] = read()
    if members:
        yield _sample(key, members, origin)


def _sample(key: str, members: dict[str, bytes], origin: str) -> Sample | Refused:
    """One sample of a shard (its files by extension): the image file's bytes as they are, the caption
    from .txt (else .json's), the url from .json (else where the sample lies); or NO_IMAGE."""
    image = next((ext for ext in members if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image is None:
        return NO_IMAGE
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    text = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
    return Sample(
        url=meta.get("url") or f"{origin}#{key}",
        caption=str(text or "").strip(),
        data=members[image],
        # rayclip's own exports name the sha256 of these very bytes; img2dataset's `sha256` is of the
        # download, which differs once it resized or re-encoded, so it is not a check here.
        expected_sha256=meta.get("media_id"),
    )


def _failures(sidecar: Location) -> Iterator[Refused]:
    return (sample for sample in parquet_samples(sidecar, check_hash=False) if isinstance(sample, Refused))


def _chained(*parts: Shard) -> Shard:
    return lambda: itertools.chain.from_iterable(part() for part in parts)
