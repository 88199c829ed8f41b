"""Query side: encode a text or an image, FAISS top-k, join the mapping.

A Searcher loads the CURRENT build (index + mapping) and its model once, then answers many
queries. `refresh()` picks up a build published later (the query service calls it per request);
a build is only ever read after CURRENT names it, so a reader never sees a partial build.

One entry point, `find(queries, options)`: a query is a list of Terms (terms.py: text, image, a
stored media_id, or a vector), the knobs (k, where, collapse) a SearchOptions passed once. The other
methods (search_text, search_texts, search_image, search, search_vectors) are spellings of it.
Every result list names the build it came from (`build_id`, `model_version`) and each result its
`faiss_id` in that build: a build published mid-query can never mislabel them.

builds.py loads a build: read in place from a local data root; from an object store, downloaded
once into this machine's cache (storage.cache_home(), keyed by the root, model_version and build_id;
a committed build never changes), so a restart on the same build downloads nothing. The rest of a
query lives beside it: terms.py encodes, filters.py keeps rows, collapse.py folds near-duplicates,
caption_hits.py searches captions, results.py joins the mapping.
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

from ..errors import UserError, WithdrawnError
from ..model import ClipModel, load_model
from ..options import COLLAPSE_RANGE, DEFAULT_COLLAPSE, SearchOptions
from ..store import catalog, storage
from ..store.catalog import BuildInfo
from ..store.storage import Location
from . import filters, knn
from .builds import Build, load_build, spec_from_build
from .caption_hits import caption_hits
from .collapse import collapsed, stored_vectors
from .knn import Residency
from .mapping import Mapping
from .results import SearchResults, join
from .terms import Term, query_vectors, stored_vector


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
        root = storage.resolved(data_dir)
        model_version = catalog.pick_indexed(root, model_version)
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
        query_model = load_model(spec_from_build(build.info), threads=threads, precision=precision, kept=True)
        return cls(root, model_version, query_model, build, residency)

    def snapshot(self) -> Build:
        """The build served now, as one object: its id, mapping and index always belong together."""
        return self._build

    @property
    def build_info(self) -> BuildInfo:
        """The build.json of the build served now (what /api/status shows)."""
        return self._build.info

    @property
    def mapping(self) -> Mapping:
        """The CURRENT build's mapping: rows by faiss_id, faiss_ids by media_id (`.table`: row i
        describes faiss_id i)."""
        return self._build.mapping

    def vectors(self, faiss_ids) -> np.ndarray:
        """The indexed vectors of these faiss_ids, as every query and collapse uses them (stored_vectors)."""
        return stored_vectors(self._build.knn, faiss_ids)

    def refresh(self) -> bool:
        """Switch to the build CURRENT names now, if it changed; True when it did. WithdrawnError when
        CURRENT is gone (the model_version was removed), a UserError when it names a build that cannot be read."""
        build_id = catalog.current_build(self.root, self.model_version)
        if build_id == self._build.build_id:
            return False
        if build_id is None:
            raise WithdrawnError(self.model_version)
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
        low, high = COLLAPSE_RANGE
        if options.collapse is not None and not low <= options.collapse <= high:
            raise UserError(
                f"collapse threshold {options.collapse} is not a cosine; use a number from {low} to {high},"
                f" e.g. {DEFAULT_COLLAPSE}"
            )
        build = self._build  # one consistent build for the whole call, even if refresh() swaps it
        notes: list[list[str]] = [[] for _ in queries]
        with self._phase("encode"):
            vectors = query_vectors(self.model, build, queries, notes)
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
        return stored_vector(self._build, media_id)

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
                    SearchResults(caption_hits(build, q, k, collapse, allowed), list(notes), **labels) for q in queries
                ]
        if collapse is None:
            with self._phase("search"):
                scores, ids = _search(build, queries, k, allowed)
            with self._phase("join"):
                return [SearchResults(join(build, s, i), list(notes), **labels) for s, i in zip(scores, ids)]
        with self._phase("search"):  # grouping searches deeper and joins as it goes
            results, search = [], functools.partial(_search, build)
            for query in queries:
                scores, ids, folded = collapsed(build.knn, search, query, k, collapse, allowed)
                joined = [dataclasses.replace(r, duplicates=int(n)) for r, n in zip(join(build, scores, ids), folded)]
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


def _search(build: Build, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k in the build's image index, with the knobs the build tuned (knn.search)."""
    return knn.search(build.knn, queries, k, allowed)
