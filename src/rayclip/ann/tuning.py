"""How good a built index is: exact neighbours of held-out queries (`Truth`), recall judged by score with
ties, the cheapest knobs that reach a recall target (`tune`, `Tuning`), and latency."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .knobs import apply_parameters, candidate_parameters

# Exact scores this close count as equal when recall is judged: float32 inner products of the same
# vector computed in different BLAS blocks differ by ~1e-7, and 1e-4 of cosine orders nothing a user sees.
TIE_TOLERANCE = 1e-4


@dataclasses.dataclass
class Truth:
    """Held-out query vectors, their own faiss_ids, and their exact nearest neighbours so far."""

    queries: np.ndarray  # float32 [q, dim]
    query_ids: np.ndarray  # int64 [q]
    ids: np.ndarray  # int64 [q, depth], -1 where unknown
    scores: np.ndarray  # float32 [q, depth]

    @classmethod
    def empty(cls, queries: np.ndarray, query_ids: np.ndarray, depth: int) -> Truth:
        q = len(queries)
        return cls(queries, query_ids, np.full((q, depth), -1, np.int64), np.full((q, depth), -np.inf, np.float32))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Merge exact scores against these vectors (streamed: one chunk at a time)."""
        import faiss

        if not len(vectors) or not len(self.queries):
            return
        depth = self.ids.shape[1]
        scores, positions = faiss.knn(
            self.queries, vectors, min(depth, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT
        )
        self.merge(np.where(positions >= 0, ids[positions], -1), scores)

    def merge(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Keep the best of these neighbours and the known ones (another part's Truth of the same queries)."""
        depth = self.ids.shape[1]
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :depth]
        self.scores = np.take_along_axis(merged_scores, order, axis=1)
        self.ids = np.take_along_axis(merged_ids, order, axis=1)

    def forget(self, ids: np.ndarray) -> None:
        """Drop neighbours whose vectors changed (they are re-added with `add`)."""
        stale = np.isin(self.ids, ids)
        self.ids = np.where(stale, -1, self.ids)
        self.scores = np.where(stale, -np.inf, self.scores)
        order = np.argsort(-self.scores, axis=1, kind="stable")
        self.scores = np.take_along_axis(self.scores, order, axis=1)
        self.ids = np.take_along_axis(self.ids, order, axis=1)

    def exact_neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(usable query rows, their kept exact neighbours' ids and scores without the query itself,
        best first, padded with -1 and -inf).

        A query is usable while it still knows k+1 neighbours: after `forget`, anything below the
        last one kept could be missing."""
        known = (self.ids >= 0).sum(axis=1)
        usable = np.flatnonzero(known >= min(k + 1, self.ids.shape[1]))
        kept = self.ids[usable]
        others = (kept != self.query_ids[usable, None]) & (kept >= 0)
        order = np.argsort(~others, axis=1, kind="stable")  # the others first, still best first
        ids = np.take_along_axis(np.where(others, kept, -1), order, axis=1)
        scores = np.take_along_axis(np.where(others, self.scores[usable], -np.inf), order, axis=1)
        return usable, ids, scores

    def ties_past_depth(self, k: int) -> int:
        """Usable queries whose full list of kept neighbours ends still tied with the k-th: more
        equal vectors may lie below it (`recall` says what that costs). A list that is not full
        holds every vector there is."""
        usable, ids, scores = self.exact_neighbours(k)
        last = scores[np.arange(len(usable)), (ids >= 0).sum(axis=1) - 1]
        full = (self.ids[usable] >= 0).all(axis=1)
        return int((full & (last >= scores[:, k - 1] - TIE_TOLERANCE)).sum())

    def save(self, path) -> None:
        np.savez(path, queries=self.queries, query_ids=self.query_ids, ids=self.ids, scores=self.scores)

    @classmethod
    def load(cls, path) -> Truth:
        with np.load(path) as data:
            return cls(data["queries"], data["query_ids"], data["ids"], data["scores"])


def _without(ids: np.ndarray, own: int, k: int) -> np.ndarray:
    """The first k ids that are not the query's own (a held-out query is in the index too)."""
    kept = ids[(ids != own) & (ids >= 0)][:k]
    return np.pad(kept, (0, k - len(kept)), constant_values=-1)


def recall(index, truth: Truth, params: dict, k: int) -> float:
    """Mean share of each usable query's k results that are among its exact k nearest, judged by
    score: a result counts when its exact score reaches the k-th exact score less TIE_TOLERANCE.

    Ids cannot decide: of two equal vectors (one image saved twice, or equal within float
    rounding) exact search keeps an arbitrary one, and an index returning the other is right.
    A result the truth did not keep (below its TRUTH_DEPTH neighbours) counts as a miss: its exact
    score is unknown, at most the last kept one. That is exact unless the query's ties run past
    the kept depth (more equal vectors than it keeps, e.g. one image saved 40 times): then a tied
    result outside it is miscounted, so the figure can only understate the recall, and
    build.json's `ties_past_depth` says on how many queries that can happen."""
    usable, ids, scores = truth.exact_neighbours(k)
    if not len(usable):
        return 1.0
    apply_parameters(index, params)
    _, found = index.search(truth.queries[usable], k + 1)
    returned = np.array([_without(f, own, k) for f, own in zip(found, truth.query_ids[usable])])
    same = (returned[:, :, None] == ids[:, None, :]) & (returned[:, :, None] >= 0)  # [query, result, kept]
    exact_score = np.where(same, scores[:, None, :], -np.inf).max(axis=2)
    cut = scores[:, k - 1] - TIE_TOLERANCE  # a usable query keeps at least k neighbours besides itself
    return float(np.mean((exact_score >= cut[:, None]).sum(axis=1) / k))


@dataclasses.dataclass
class Tuning:
    params: dict
    recall_at_k: float
    k: int
    target: float
    queries: int  # held-out queries the recall was measured on; 0 for exact search, never measured
    p50_ms: float
    p99_ms: float
    tried: list[dict]
    exact: bool = False
    ties_past_depth: int = 0  # measured queries whose recall may be understated (see `recall`)

    @property
    def target_met(self) -> bool:
        return self.recall_at_k >= self.target

    def record(self) -> dict:
        """build.json's `recall`: exact search is right by construction, anything else is measured."""
        if self.exact:
            return {"exact": True, "target": self.target, "met": True}
        return {
            f"recall_at_{self.k}": self.recall_at_k,
            "target": self.target,
            "met": self.target_met,
            "queries": self.queries,
            "against": "exact inner-product search over the same vectors; a result counts when its exact "
            f"score is at least the {self.k}th's less tie_tolerance (of equal vectors, either one is right)",
            "tie_tolerance": TIE_TOLERANCE,
            "ties_past_depth": self.ties_past_depth,
            "tried": self.tried,
        }


def exact(index) -> bool:
    """Whether the index searches exhaustively over the full vectors (its recall is 1 by construction)."""
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def tune(index, truth: Truth, target: float, k: int, latency_queries: int) -> Tuning:
    """The cheapest knobs reaching `target` recall@k (else the most thorough tried), applied,
    then timed one query at a time. Exact search has no knobs and nothing to measure."""
    if exact(index):
        return Tuning({}, 1.0, k, target, 0, *latency(index, truth.queries[:latency_queries], k), [], exact=True)
    tried = []
    for params in candidate_parameters(index):
        measured = recall(index, truth, params, k)
        tried.append(params | {"recall": round(measured, 4)})
        if measured >= target or (len(tried) > 2 and measured <= tried[-3]["recall"]):
            break  # reached, or no longer improving
    reached = [t for t in tried if t["recall"] >= target]
    best = reached[0] if reached else max(tried, key=lambda t: t["recall"])
    params = {key: value for key, value in best.items() if key != "recall"}
    apply_parameters(index, params)
    p50, p99 = latency(index, truth.queries[:latency_queries], k)
    measured_on = len(truth.exact_neighbours(k)[0])
    return Tuning(
        params, best["recall"], k, target, measured_on, p50, p99, tried, ties_past_depth=truth.ties_past_depth(k)
    )


def latency(index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 milliseconds of one-query searches."""
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], k)
        times.append((time.perf_counter() - started) * 1000)
    if not times:
        return 0.0, 0.0
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)
