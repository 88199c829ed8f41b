"""The one query service: the Searchers of a data root, opened once per model_version and kept
following CURRENT, for the CLI, the Python API, /api/* and clip-retrieval's routes alike.

One cache, one lock, one "no index yet" path: `searcher(model_version)` opens a model_version's
Searcher on first use and afterwards reads its CURRENT (one small object) per call, switching to
a build published since. The list of published model_versions is read once and read again only
when a name it does not hold is asked for, or a known one's CURRENT is gone, never per request.

The data root is resolved once (the CLI or the app pass a Location, which is used as it is), and the list of published
model_versions is the service's: a Searcher is loaded by name and never lists gold/ itself.
Errors are catalog.pick_model_version's (NoIndexError, UnknownModelVersionError): they say what
went wrong, http/errors.py which status that is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import NoIndexError, UserError
from ..options import SearchOptions
from ..store import catalog, storage
from ..store.storage import Location
from .knn import Residency
from .results import SearchResults
from .searcher import Searcher
from .terms import Term


class QueryService:
    """Searchers by model_version over one data root; safe to share between threads."""

    def __init__(
        self,
        root: Location | str | Path | None,
        model_version: str | None = None,
        *,
        precision: str = SearchOptions.precision,
        threads: int | None = None,
        observe: Callable[[str, float], None] | None = None,
        residency: Residency = Residency(),
    ):
        self.root = storage.resolved(root)  # a Location from the edge is not resolved again
        self.default = model_version  # the one served when a request names none
        self.precision = precision
        self.threads = threads
        self.observe = observe  # told each query phase's seconds (the server's metrics)
        self.residency = residency  # how each build's image index is held (RAM, mapped, shards elsewhere)
        self._searchers: dict[str, Searcher] = {}
        self._names: list[str] | None = None
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The published model_versions (cached; see the module's note on when it is read again)."""
        with self._lock:
            return list(self._published(refresh=False))

    def searcher(self, model_version: str | None = None) -> Searcher:
        """The Searcher of this model_version (default: the service's, else the only one published),
        on the build CURRENT names now."""
        with self._lock:
            name = self._pick(model_version)
            searcher = self._searchers.get(name)
            try:
                if searcher is None:
                    searcher = Searcher.load(
                        self.root, name, threads=self.threads, precision=self.precision, residency=self.residency
                    )
                    searcher.observe = self.observe
                    self._searchers[name] = searcher
                else:
                    searcher.refresh()
            except UserError as err:
                if catalog.current_build(self.root, name) is None:  # withdrawn: forget it and the list
                    self._searchers.pop(name, None)
                    self._names = None
                raise NoIndexError(str(err)) from None
            return searcher

    def cached(self, model_version: str | None = None) -> Searcher | None:
        """The Searcher already open for this model_version (the default one when None), if any; opens nothing."""
        with self._lock:
            if model_version is None:
                model_version = self.default or (next(iter(self._searchers)) if len(self._searchers) == 1 else None)
            return self._searchers.get(model_version)

    def find(
        self, queries: list[list[Term]], options: SearchOptions | None = None, model_version: str | None = None
    ) -> list[SearchResults]:
        """Searcher.find on the model_version's CURRENT build; each result list names its build."""
        options = options or SearchOptions()
        return self.searcher(model_version or options.model_version).find(queries, options)

    def search(self, terms: list[Term], options: SearchOptions | None = None) -> SearchResults:
        """One combined query (a single term is the plain text or image search)."""
        return self.find([terms], options)[0]

    def _pick(self, asked: str | None) -> str:
        asked = asked or self.default
        names = self._published(refresh=False)
        if (asked and asked not in names) or (not asked and len(names) != 1):
            names = self._published(refresh=True)  # something published or withdrawn since
        return catalog.pick_model_version(self.root, asked, names, "index")

    def _published(self, refresh: bool) -> list[str]:
        if refresh or self._names is None:
            self._names = catalog.gold_model_versions(self.root)
        return self._names


def search(
    terms: list[Term],
    options: SearchOptions | None = None,
    data_dir: str | Path | None = None,
) -> SearchResults:
    """One query from the command line or a script: opens the index, searches, returns the results
    (each naming its build). For many queries keep a QueryService (or a Searcher) instead."""
    options = options or SearchOptions()
    service = QueryService(data_dir, options.model_version, precision=options.precision)
    return service.search(terms, options)
