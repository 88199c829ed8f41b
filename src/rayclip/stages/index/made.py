"""What every part of a build shares: its constants, and what a full or incremental build made before
it is published."""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from ... import ann
from ...store.storage import Location

NORM_TOLERANCE = 1e-3
TRAIN_SAMPLE = 100_000  # vectors used to train an index type that needs training (IVF, PQ)
TRAIN_PER_LIST = 16  # ... or this many per inverted list when that is more
RECALL_K = 10
TUNING_QUERIES = 1_000  # held-out vectors whose exact neighbours measure every build
TRUTH_DEPTH = 32  # exact neighbours kept per tuning query, so an incremental build can update them
LATENCY_QUERIES = 300  # single-query searches timed for p50/p99
REBUILD_SHARE = 0.5  # an incremental build adding more than this share of the index retrains instead
UNIQUE_KEY_CHARS = 32  # a media_id's last hex digits the mapping's uniqueness check compares (128 bits)
UNIQUE_ROW_BYTES = 96  # the check's memory per row: the keys, their offsets and the hash table
MAPPING_ROW_BYTES = 1_000  # a mapping task's memory per row (measured: ~760 B over its 0.2 GiB base)


@dataclasses.dataclass
class Made:
    """An index filled from silver, before publishing: held here (an incremental build, `index`) or
    already written into the build's folder by the build's steps (`tuning` measured there)."""

    index: object | None
    index_type: str
    rows: pa.Table | None  # faiss_id, media_id, embedded_at (None: the steps wrote the mapping)
    truth: ann.Truth
    dropped: int
    base_build: str | None = None
    added: int = 0
    replaced: int = 0
    count: int = 0
    tuning: ann.Tuning | None = None
    form: str = "single"
    shards: list[dict] | None = None
    steps: dict | None = None  # how the steps ran: parts, where, and auto's note on the family
    written: list[Location] = dataclasses.field(default_factory=list)  # index and mapping files the steps wrote
    mapped: int = 0  # rows of the mapping the steps wrote
    unique: int = 0  # distinct media_ids among them (counted by the step that wrote it)
