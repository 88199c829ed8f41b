"""Query side: encode a text or an image, FAISS top-k, join the mapping.

A Searcher loads the CURRENT build (index + mapping) and its model once, then answers many
queries. `refresh()` picks up a build published later (the HTTP service calls it per request);
a build is only ever read after CURRENT names it, so a reader never sees a partial build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from . import layout
from .errors import UserError
from .index import current_build, pick_model_version
from .model import REFERENCE_ALIAS, ClipModel, ModelSpec, decode_image, load_model, resolve


@dataclasses.dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float  # cosine similarity
    media_id: str
    path: str | None
    url: str | None
    caption: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SearchResults(list):
    """A list of SearchResult, plus notes on how the query was adjusted (clamped k, truncated text)."""

    def __init__(self, results: list[SearchResult], notes: list[str] | None = None):
        super().__init__(results)
        self.notes = notes or []


@dataclasses.dataclass(frozen=True)
class _Build:
    build_id: str
    info: dict
    index: object
    mapping: object  # pyarrow Table ordered by faiss_id


def _spec_from_build(info: dict) -> ModelSpec:
    """The model the build's vectors came from; a local checkpoint must still be the same file."""
    recorded = info.get("model")
    if not recorded:
        raise UserError(f"build {info['build_id']} does not record its model; rebuild with `rayclip index`")
    if recorded["pretrained"] == REFERENCE_ALIAS:
        spec = resolve(None, REFERENCE_ALIAS)
    elif recorded.get("checkpoint"):
        spec = resolve(recorded["name"], recorded["checkpoint"])
    else:
        spec = ModelSpec(recorded["name"], recorded["pretrained"])
    if recorded.get("checkpoint_sha256") and spec.checkpoint_sha256 != recorded["checkpoint_sha256"]:
        raise UserError(f"the checkpoint of build {info['build_id']} changed on disk since it was embedded; re-embed")
    return dataclasses.replace(spec, version=info["model_version"])


def _load_build(root: Path, model_version: str, build_id: str) -> _Build:
    import faiss

    folder = layout.build_dir(root, model_version, build_id)
    try:
        info = json.loads((folder / "build.json").read_text())
        index = faiss.read_index(str(folder / "index.faiss"))
        mapping = pq.read_table(folder / "mapping.parquet")
    except (OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"build {build_id} of {model_version} cannot be read: {str(exc).splitlines()[0]}") from None
    ids = mapping.column("faiss_id").to_numpy()
    if not (index.ntotal == mapping.num_rows == info["count"]) or not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(
            f"build {build_id} of {model_version} is broken: index has {index.ntotal} vectors, "
            f"mapping {mapping.num_rows} rows, build.json {info['count']}; roll back with `rayclip index --rollback`"
        )
    return _Build(build_id, info, index, mapping)


class Searcher:
    """Text→image and image→image search over one model_version's CURRENT build."""

    def __init__(self, root: Path, model_version: str, model: ClipModel, build: _Build):
        self.root = root
        self.model_version = model_version
        self.model = model
        self._build = build
        self._lock = threading.Lock()
        # Told the seconds of each query phase (encode, search, join): the server's metrics.
        self.observe: Callable[[str, float], None] | None = None

    @contextlib.contextmanager
    def _phase(self, name: str):
        started = time.perf_counter()
        yield
        if self.observe:
            self.observe(name, time.perf_counter() - started)

    @classmethod
    def open(
        cls, data_dir: str | Path | None = None, model_version: str | None = None, threads: int | None = None
    ) -> Searcher:
        root = layout.data_root(data_dir)
        model_version = pick_model_version(root, model_version, layout.gold_model_versions(root), "index")
        build_id = current_build(root, model_version)
        build = _load_build(root, model_version, build_id)
        return cls(root, model_version, load_model(_spec_from_build(build.info), threads=threads), build)

    @property
    def info(self) -> dict:
        b = self._build
        return {
            "model_version": self.model_version,
            "build_id": b.build_id,
            "count": b.info["count"],
            "model": b.info["model"],
        }

    @property
    def mapping(self):
        """The CURRENT build's mapping table (row i describes faiss_id i)."""
        return self._build.mapping

    def vectors(self, faiss_ids: list[int]) -> np.ndarray:
        """The indexed vectors of these faiss_ids (exact for the flat index)."""
        return self._build.index.reconstruct_batch(np.asarray(faiss_ids, dtype=np.int64))

    def refresh(self) -> bool:
        """Switch to the build CURRENT names now, if it changed; True when it did."""
        build_id = current_build(self.root, self.model_version)
        if build_id == self._build.build_id:
            return False
        with self._lock:
            if build_id != self._build.build_id:
                self._build = _load_build(self.root, self.model_version, build_id)
        return True

    # ---------------------------------------------------------------- queries

    def search_text(self, text: str, k: int = 10) -> SearchResults:
        return self.search_texts([text], k)[0]

    def search_texts(self, texts: list[str], k: int = 10) -> list[SearchResults]:
        """Many text queries in one encoder batch."""
        if any(not text or not text.strip() for text in texts):
            raise UserError("the query is empty; give some words to search for")
        with self._phase("encode"):
            vectors = self.model.encode_texts([t.strip() for t in texts])
        results = self.search_vectors(vectors, k)
        limit = self.model.context_length
        for text, result in zip(texts, results):
            tokens = self.model.token_count(text)
            if tokens > limit:
                result.notes.insert(0, f"query truncated to the model's {limit} tokens (it has {tokens})")
        return results

    def search_image(self, image: str | Path | bytes, k: int = 10) -> SearchResults:
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            picture = decode_image(data)
        except Exception:  # unreadable file or undecodable bytes: both are the user's to fix
            raise UserError(
                f"cannot read the query image{'' if isinstance(image, bytes) else ' ' + str(image)}"
            ) from None
        with self._phase("encode"):
            vectors = self.model.encode_images([picture])
        return self.search_vectors(vectors, k)[0]

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[SearchResults]:
        build = self._build  # one consistent build for the whole call, even if refresh() swaps it
        total = build.index.ntotal
        notes = []
        if k < 1 or k > total:
            notes.append(f"k={k} clamped to {min(max(k, 1), total)} (the index holds {total} vectors)")
            k = min(max(k, 1), total)
        with self._phase("search"):
            scores, ids = build.index.search(np.ascontiguousarray(vectors, np.float32), k)
        with self._phase("join"):
            return [SearchResults(self._join(build, s, i), list(notes)) for s, i in zip(scores, ids)]

    @staticmethod
    def _join(build: _Build, scores: np.ndarray, ids: np.ndarray) -> list[SearchResult]:
        keep = ids >= 0  # FAISS pads with -1 when fewer than k results exist
        rows = build.mapping.take(ids[keep]).select(["media_id", "path", "url", "caption"]).to_pylist()
        return [
            SearchResult(rank=r + 1, score=round(float(s), 6), **row)
            for r, (s, row) in enumerate(zip(scores[keep], rows))
        ]
