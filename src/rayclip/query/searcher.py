"""Query side: encode a text or an image, FAISS top-k, join the mapping.

A Searcher loads the CURRENT build (index + mapping) and its model once, then answers many
queries. `refresh()` picks up a build published later (the query service calls it per request);
a build is only ever read after CURRENT names it, so a reader never sees a partial build.

One entry point, `find(queries, options)`: a query is a list of Terms (text, image, a stored
media_id, or a vector), the knobs (k, where, collapse) a SearchOptions passed once. The other
methods (search_text, search_texts, search_image, search, search_vectors) are spellings of it.
Every result list names the build it came from (`build_id`, `model_version`) and each result its
`faiss_id` in that build: a build published mid-query can never mislabel them.

builds.py loads a build: read in place from a local data root; from an object store, downloaded
once into this machine's cache (storage.cache_home(), keyed by the root, model_version and build_id;
a committed build never changes), so a restart on the same build downloads nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..images import open_query_image
from ..model import ClipModel, load_model
from ..options import DEFAULT_COLLAPSE, SearchOptions
from ..store import catalog, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location
from . import filters, knn
from .builds import Build, load_build, spec_from_build
from .knn import LocalIndex, Residency, ShardedIndex
from .mapping import ABSENT, Mapping

__all__ = ["DEFAULT_COLLAPSE", "SearchOptions", "SearchResult", "SearchResults", "Searcher", "Term", "NotIndexedError"]

COLLAPSE_DEPTH = 4  # candidates fetched per wanted group, multiplied again while groups are short


@dataclasses.dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float  # cosine similarity
    media_id: str
    path: str | None
    url: str | None
    caption: str | None
    duplicates: int = 0  # near-duplicate results folded into this one (collapse)
    faiss_id: int = -1  # its row in the build named by SearchResults.build_id
    caption_row: int | None = None  # searching captions: the caption found (its row in the build's caption index)

    def to_dict(self) -> dict:
        shown = dataclasses.asdict(self)
        if self.caption_row is None:  # an image search's results read as they always did
            del shown["caption_row"]
        return shown


class SearchResults(list):
    """A list of SearchResult, plus notes on how the query was adjusted (clamped k, truncated text)
    and the build the results come from: its faiss_ids are rows of that build's mapping."""

    def __init__(
        self,
        results: list[SearchResult],
        notes: list[str] | None = None,
        *,
        build_id: str | None = None,
        model_version: str | None = None,
    ):
        super().__init__(results)
        self.notes = notes or []
        self.build_id = build_id
        self.model_version = model_version


TERM_KINDS = ("text", "image", "media_id", "vector")


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of a combined query: a text, an image (path or bytes), an indexed media_id (its
    stored vector is reused) or a query vector, with a weight; a negative weight subtracts it."""

    kind: str
    value: str | Path | bytes | np.ndarray
    weight: float = 1.0

    @classmethod
    def parse(cls, kind: str, written: str, sign: float = 1.0) -> Term:
        """rclip's weighted form: '2:red car' is text 'red car' with weight 2 (times sign)."""
        weight, value = 1.0, written
        head, colon, rest = written.partition(":")
        if colon and rest:
            try:
                weight, value = float(head), rest
            except ValueError:
                pass  # a colon that is part of the text or path
        return cls(kind, value, sign * weight)

    @property
    def title(self) -> str:
        """The term as a person reads it in a query's title: `+ 'red car'`, `- 2×image a.jpg`."""
        shown = {"text": repr(self.value), "image": f"image {self.value}", "media_id": f"like {str(self.value)[:12]}"}
        sign, weight = "+" if self.weight > 0 else "-", abs(self.weight)
        return f"{sign} {'' if weight == 1 else f'{weight:g}×'}{shown.get(self.kind, self.kind)}"


class NotIndexedError(UserError):
    """A media_id the build does not hold."""


class Searcher:
    """Text→image and image→image search over one model_version's CURRENT build."""

    def __init__(
        self, root: Location, model_version: str, model: ClipModel, build: Build, residency: Residency = Residency()
    ):
        self.root = root
        self.model_version = model_version
        self.model = model
        self._build = build
        self.residency = residency  # how each build it loads holds its image index
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
        cls,
        data_dir: str | Path | None = None,
        model_version: str | None = None,
        threads: int | None = None,
        precision: str = SearchOptions.precision,
        residency: Residency = Residency(),
    ) -> Searcher:
        """The Searcher of a data root's model_version (the only one published when None): `load`,
        for a script; a QueryService keeps the list of model_versions and calls `load` itself."""
        root = storage.data_root(data_dir)
        model_version = catalog.pick_model_version(root, model_version, catalog.gold_model_versions(root), "index")
        return cls.load(root, model_version, threads, precision, residency)

    @classmethod
    def load(
        cls,
        root: Location,
        model_version: str,
        threads: int | None = None,
        precision: str = SearchOptions.precision,
        residency: Residency = Residency(),
    ) -> Searcher:
        """The CURRENT build of this model_version and its query model. `precision` is the query
        encoder's (model.choose_precision: bf16 where the CPU runs it natively); `residency` how the
        image index is held (in RAM, mapped, in shards elsewhere)."""
        build = load_build(root, model_version, catalog.current_build(root, model_version), residency)
        query_model = load_model(spec_from_build(build.info), threads=threads, precision=precision)
        return cls(root, model_version, query_model, build, residency)

    def snapshot(self) -> Build:
        """The build served now, as one object: its id, mapping and index always belong together."""
        return self._build

    @property
    def build(self) -> BuildInfo:
        """The build.json of the build served now (what /api/status shows)."""
        return self._build.info

    @property
    def mapping(self) -> pa.Table:
        """The CURRENT build's mapping table (row i describes faiss_id i)."""
        return self._build.mapping.table

    @property
    def mapping_rows(self) -> Mapping:
        """The CURRENT build's mapping: rows by faiss_id, faiss_ids by media_id."""
        return self._build.mapping

    def vectors(self, faiss_ids) -> np.ndarray:
        """The indexed vectors of these faiss_ids, as every query and collapse uses them (stored_vectors)."""
        return stored_vectors(self._build.knn, faiss_ids)

    def refresh(self) -> bool:
        """Switch to the build CURRENT names now, if it changed; True when it did. A UserError when
        CURRENT is gone (the model_version was removed) or names a build that cannot be read."""
        build_id = catalog.current_build(self.root, self.model_version)
        if build_id == self._build.build_id:
            return False
        if build_id is None:
            raise UserError(f"no index for model_version {self.model_version!r} any more; run `rayclip index`")
        with self._lock:
            if build_id != self._build.build_id:
                self._build = load_build(self.root, self.model_version, build_id, self.residency)
        return True

    # ---------------------------------------------------------------- queries

    def find(self, queries: list[list[Term]], options: SearchOptions | None = None) -> list[SearchResults]:
        """The one way in: each query is a list of terms, their weighted sum (normalised) is searched;
        a query of one term of weight 1 searches that term's vector as it is. Texts of all the
        queries are encoded in one batch. `options` carries k, where and collapse (its
        model_version and precision are the Searcher's own, chosen at open)."""
        options = options or SearchOptions()
        if options.collapse is not None and not -1.0 <= options.collapse <= 1.0:
            raise UserError(
                f"collapse threshold {options.collapse} is not a cosine; use a number from -1 to 1, e.g. 0.96"
            )
        build = self._build  # one consistent build for the whole call, even if refresh() swaps it
        notes: list[list[str]] = [[] for _ in queries]
        with self._phase("encode"):
            vectors = self._query_vectors(build, queries, notes)
        results = self._search_vectors(build, vectors, options)
        for note, result in zip(notes, results):
            result.notes[:0] = note
        return results

    def search_text(self, text: str, k: int = SearchOptions.k, **knobs) -> SearchResults:
        return self.search_texts([text], k, **knobs)[0]

    def search_texts(self, texts: list[str], k: int = SearchOptions.k, **knobs) -> list[SearchResults]:
        """Many text queries in one encoder batch."""
        return self.find([[Term("text", text)] for text in texts], SearchOptions(k=k, **knobs))

    def search_image(self, image: str | Path | bytes, k: int = SearchOptions.k, **knobs) -> SearchResults:
        return self.find([[Term("image", image)]], SearchOptions(k=k, **knobs))[0]

    def search(self, terms: list[Term], k: int = SearchOptions.k, **knobs) -> SearchResults:
        """A combined query: the weighted sum of the terms' vectors, normalised, searched."""
        return self.find([terms], SearchOptions(k=k, **knobs))[0]

    def search_vectors(self, vectors: np.ndarray, k: int = SearchOptions.k, **knobs) -> list[SearchResults]:
        """Top-k per query vector, searched as given (normalise them for cosine scores)."""
        return self.find([[Term("vector", vector)] for vector in vectors], SearchOptions(k=k, **knobs))

    def stored_vector(self, media_id: str) -> np.ndarray:
        """The indexed vector of a media_id, reused instead of decoding and encoding its image again."""
        return self._stored_vector(self._build, media_id)

    @staticmethod
    def _stored_vector(build: Build, media_id: str) -> np.ndarray:
        position = int(build.mapping.faiss_ids([media_id])[0])
        if position == ABSENT:
            raise NotIndexedError(f"media_id {media_id} is not in build {build.build_id}")
        return stored_vectors(build.knn, [position])[0]

    def _query_vectors(self, build: Build, queries: list[list[Term]], notes: list[list[str]]) -> np.ndarray:
        """One vector per query: texts in one encoder batch, images decoded and encoded, media_ids
        read back from the index, vectors taken as given."""
        texts: dict[str, np.ndarray] = {}
        for note, terms in zip(notes, queries):
            if not terms:
                raise UserError("give at least one query term (text, image or media_id)")
            for term in terms:
                if term.kind not in TERM_KINDS:
                    raise UserError(f"unknown query term kind {term.kind!r}; use one of {', '.join(TERM_KINDS)}")
                if term.kind == "text":
                    text = str(term.value).strip()
                    if not text:
                        raise UserError("the query is empty; give some words to search for")
                    tokens, limit = self.model.token_count(text), self.model.context_length
                    if tokens > limit:
                        note.append(f"query truncated to the model's {limit} tokens (it has {tokens})")
                    texts[text] = None
        if texts:
            texts = dict(zip(texts, self.model.encode_texts(list(texts))))

        def vector(term: Term) -> np.ndarray:
            if term.kind == "text":
                return texts[str(term.value).strip()]
            if term.kind == "image":
                return self.model.encode_images([open_query_image(term.value)])[0]
            if term.kind == "media_id":
                return self._stored_vector(build, str(term.value))
            return np.asarray(term.value, dtype=np.float32)

        combined = []
        for terms in queries:
            if len(terms) == 1 and terms[0].weight == 1.0:
                combined.append(vector(terms[0]))
                continue
            total = np.sum([term.weight * vector(term) for term in terms], axis=0)
            norm = float(np.linalg.norm(total))
            if not norm >= 1e-6:
                raise UserError("the query terms cancel out; change their weights")
            combined.append(total / norm)
        dim = build.knn.d
        if any(v.shape != (dim,) for v in combined):
            raise UserError(f"a query vector needs {dim} numbers, the dimension of build {build.build_id}")
        return np.ascontiguousarray(np.stack(combined) if combined else np.zeros((0, dim)), np.float32)

    def _search_vectors(self, build: Build, queries: np.ndarray, options: SearchOptions) -> list[SearchResults]:
        """Top-k per query vector, among the rows `where` keeps (filtered inside FAISS, so k come
        back whenever k rows match). With `collapse` (a cosine threshold), a result that close to a
        higher-ranked one is folded into it, and the k results are k distinct groups."""
        k, where, collapse = options.k, options.where, options.collapse
        labels = {"build_id": build.build_id, "model_version": self.model_version}
        allowed = None if where is None else filters.matching_ids(build.mapping.table, where).to_numpy()
        total = build.knn.ntotal if allowed is None else len(allowed)
        if total == 0:
            return [SearchResults([], ["no indexed row matches the filter"], **labels) for _ in queries]
        notes = []
        if k < 1 or k > total:
            held = "the index holds" if allowed is None else "the filter keeps"
            notes.append(f"k={k} clamped to {min(max(k, 1), total)} ({held} {total} vectors)")
            k = min(max(k, 1), total)
        if options.over == "captions":
            with self._phase("search"):
                return [
                    SearchResults(_caption_hits(build, q, k, collapse, allowed), list(notes), **labels) for q in queries
                ]
        if collapse is None:
            with self._phase("search"):
                scores, ids = _search(build, queries, k, allowed)
            with self._phase("join"):
                return [SearchResults(_join(build, s, i), list(notes), **labels) for s, i in zip(scores, ids)]
        with self._phase("search"):  # grouping searches deeper and joins as it goes
            results, search = [], functools.partial(_search, build)
            for query in queries:
                scores, ids, folded = _collapsed(build.knn, search, query, k, collapse, allowed)
                joined = [dataclasses.replace(r, duplicates=int(n)) for r, n in zip(_join(build, scores, ids), folded)]
                results.append(SearchResults(joined, list(notes), **labels))
            return results


def summary(searcher: Searcher) -> dict:
    """What /api/status shows of the build a Searcher serves: model_version, build_id, count, model,
    and how its image index is held (form, its bytes, the bytes this process maps)."""
    build = searcher.snapshot()
    return {
        "model_version": searcher.model_version,
        "build_id": build.build_id,
        "count": build.info.count,
        "model": build.info.model,
        "form": build.info.form,
        "index_bytes": catalog.index_bytes(build.info),
        "mapped_index_bytes": build.mapped_bytes,  # 0: read into RAM (or held by shards elsewhere)
    }


def _collapsed(
    index, search: Callable, query: np.ndarray, k: int, threshold: float, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search deeper until the hits form k groups of near-duplicates (or the rows run out):
    (scores, ids, members folded) of the k group leaders. search(queries, depth, allowed) searches `index`."""
    total = index.ntotal if allowed is None else len(allowed)
    depth = min(total, k * COLLAPSE_DEPTH)
    while True:
        scores, ids = search(query[None], depth, allowed)
        keep = ids[0] >= 0
        scores, ids = scores[0][keep], ids[0][keep]
        leaders, folded = _group_near_duplicates(stored_vectors(index, ids), threshold)
        if len(leaders) >= k or depth >= total:
            break
        depth = min(total, depth * COLLAPSE_DEPTH)
    leaders, folded = leaders[:k], folded[:k]
    return scores[leaders], ids[leaders], folded


def _caption_hits(
    build: Build, query: np.ndarray, k: int, collapse: float | None, allowed: np.ndarray | None
) -> list[SearchResult]:
    """Search the caption index; each caption found names the images that carry it (best
    clip_score first), one result each with the caption's cosine, until k. `allowed` keeps images
    (and so the captions that some allowed image carries); `collapse` folds near-duplicate captions."""
    captions = build.captions
    if captions is None:
        fix = "run `rayclip embed` (without --no-captions), then `rayclip index`"
        raise UserError(f"build {build.build_id} has no caption index; {fix}")
    rows = None if allowed is None else captions.carrying(allowed, build.knn.ntotal)
    total = captions.index.ntotal if rows is None else len(rows)
    if total == 0:
        return []
    depth = min(k, total)  # each caption carries at least one allowed image
    search = functools.partial(knn.search, captions.index)  # exact: no knobs to apply
    if collapse is None:
        scores, found = (a[0] for a in search(query[None], depth, rows))
        folded = np.zeros(len(found), np.int64)
    else:
        scores, found, folded = _collapsed(captions.index, search, query, depth, collapse, rows)
    kept = None if allowed is None else np.isin(captions.images, allowed)
    hits: list[tuple[float, int, int, int]] = []  # score, faiss_id, caption row, captions folded
    for score, row, n in zip(scores, found, folded):
        if row < 0:
            continue
        span = np.arange(captions.starts[row], captions.starts[row + 1])
        images = captions.images[span if kept is None else span[kept[span]]]
        hits += [(float(score), int(i), int(row), int(n)) for i in images[: k - len(hits)]]
        if len(hits) >= k:
            break
    joined = build.mapping.rows([i for _, i, _, _ in hits], ["media_id", "path", "url"])
    return [
        SearchResult(
            rank + 1,
            round(s, 6),
            **image,
            caption=captions.texts[row].as_py(),
            duplicates=n,
            faiss_id=i,
            caption_row=row,
        )
        for rank, ((s, i, row, n), image) in enumerate(zip(hits, joined))
    ]


def _join(build: Build, scores: np.ndarray, ids: np.ndarray) -> list[SearchResult]:
    keep = ids >= 0  # FAISS pads with -1 when fewer than k results exist
    rows = build.mapping.rows(ids[keep], ["media_id", "path", "url", "caption"])
    return [
        SearchResult(rank=r + 1, score=round(float(s), 6), **row, faiss_id=int(i))
        for r, (s, i, row) in enumerate(zip(scores[keep], ids[keep], rows))
    ]


def _search(build: Build, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k in the build's image index, with the knobs the build tuned (knn.search)."""
    return knn.search(build.knn, queries, k, allowed)


def stored_vectors(index: LocalIndex | ShardedIndex, ids) -> np.ndarray:
    """The indexed vectors of these faiss_ids, each L2-normalised: the index's own reconstruction
    (exact for a flat index, an approximation for a compressed one), scaled back to unit length so
    that inner products stay cosines. The one way anything reads vectors back from a build."""
    vectors = index.vectors(np.asarray(ids, dtype=np.int64))
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _group_near_duplicates(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Walk the ranked hits; one within `threshold` cosine of an earlier group leader joins that
    leader's group (the most similar one), else it leads a new group. Returns (leader positions,
    members folded into each leader)."""
    leaders: list[int] = []
    folded: list[int] = []
    for i, vector in enumerate(vectors):
        if leaders:
            similarity = vectors[leaders] @ vector
            closest = int(np.argmax(similarity))
            if similarity[closest] >= threshold:
                folded[closest] += 1
                continue
        leaders.append(i)
        folded.append(0)
    return np.asarray(leaders, dtype=np.int64), np.asarray(folded, dtype=np.int64)
