"""Approximate indexes: which FAISS index fits N vectors in a memory budget, what its query-time
knobs (nprobe, efSearch) must be to reach a recall target, and how good it then is.

Recall is always measured against exact search: a build keeps TUNING_QUERIES held-out vectors
and their exact neighbours (`Truth`), computed while its vectors stream past, so measuring is a
batch of ANN searches, never a second exact pass. The chosen knobs travel in build.json and the
Searcher applies them (`apply_parameters`, `search_parameters` for filtered searches).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np

from .errors import UserError

FLAT = "flat"  # IndexFlatIP: exact
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)
REFINE_K_FACTOR = 32  # a refined index re-ranks a shortlist of this many times k
ID_BYTES = 8  # an inverted list stores each vector's int64 id next to its code
# --index-type auto: below FLAT_BELOW vectors exact search is fast enough and worth its exactness;
# below HNSW_BELOW an HNSW graph over the full vectors, when it fits the memory budget; above,
# an IVF index with product-quantised codes (autofaiss's families, picked by the same arithmetic).
FLAT_BELOW = 100_000
HNSW_BELOW = 1_000_000
HNSW_LINKS = 32
MAX_NLIST = 8192  # k-means over more lists costs more CPU time than a 2-core build can spend
# Exact scores this close count as equal when recall is judged: float32 inner products of the same
# vector computed in different BLAS blocks differ by ~1e-7, and 1e-4 of cosine orders nothing a user sees.
TIE_TOLERANCE = 1e-4
_FAST_SCAN = re.compile(r"PQ\d+(x4)?fs")  # fast-scan PQ codes (PQ32x4fs, PQ32fs)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'4G', '512M', '1.5g', '2GiB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--max-index-memory {text!r} is not a size; write e.g. 4G, 512M or 2000000000")
    number, unit = match.groups()
    return int(float(number) * (1024 ** ("kmgt".index(unit.lower()) + 1) if unit else 1))


def nlist_for(count: int, max_nlist: int) -> int:
    """Inverted lists: 4·√N rounded to a power of two (autofaiss's rule of thumb), capped."""
    return int(min(max_nlist, max(16, 2 ** round(math.log2(4 * math.sqrt(max(count, 1)))))))


def index_bytes(index_type: str, count: int, dim: int) -> int:
    """Estimated in-memory bytes of an index_factory string this module chooses."""
    if index_type == FLAT:
        return count * dim * 4
    if index_type.startswith("HNSW"):
        links = int(index_type[4:])
        return count * (dim * 4 + links * 2 * 4 + 16)
    nlist = int(re.search(r"IVF(\d+)", index_type).group(1))
    # every code a vector has: IVF codes (SQ or PQ) and, behind Refine(...), the re-ranking codes
    scalar = sum(dim * int(bits) // 8 for bits in re.findall(r"SQ(\d+)", index_type))
    product = sum(int(m) * int(bits) // 8 for m, bits in re.findall(r"PQ(\d+)x(\d+)", index_type))
    centroids = nlist * dim * 4 * (2 if "_HNSW" in index_type else 1)  # twice with an HNSW graph over them
    return count * (scalar + product + ID_BYTES) + centroids


def mergeable(index_type: str) -> bool:
    """Whether indexes of this type built from parts (on one trained quantizer) can be merged, in RAM or
    on disk, and memory-mapped: IVF with plain inverted lists. Not flat or HNSW (no lists: a graph cannot
    be merged), not fast-scan codes (packed in blocks: FAISS's merge corrupts them) nor Refine(...)
    (its re-ranking codes sit outside the lists)."""
    return "IVF" in index_type and not _FAST_SCAN.search(index_type) and ",Refine(" not in index_type


def choose_index_type(count: int, dim: int, max_bytes: int, merge: bool = False) -> str:
    """Flat, then HNSW, then an IVF index whose codes take the most bytes
    that fit both the budget and a quarter of the flat index.

    First choice: 4-bit fast-scan PQ codes (dim/8 bytes, else dim/16), scanned from SIMD
    registers, find a shortlist of REFINE_K_FACTOR·k that 6-bit scalar codes of the whole vector
    re-rank. Short codes scan fast, so probing many lists costs little, and the re-ranking codes
    decide the recall (8-bit ones would not fit a quarter of flat's bytes next to the PQ codes and
    ids; 4-bit ones rank too coarsely). Where ids weigh too much for both (small dim), 6-bit codes
    of each vector's residual to its list alone. Then, for tight budgets, OPQ-rotated PQ.
    With `merge`, only types that can be built in parts and merged (`mergeable`)."""
    if count < FLAT_BELOW and index_bytes(FLAT, count, dim) <= max_bytes and not merge:
        return FLAT
    hnsw = f"HNSW{HNSW_LINKS}"
    if count < HNSW_BELOW and index_bytes(hnsw, count, dim) <= max_bytes and not merge:
        return hnsw
    nlist = nlist_for(count, MAX_NLIST)
    # Lists are found by brute force over the centroids: at most MAX_NLIST·dim multiply-adds, cheaper
    # than an HNSW walk over them at the efSearch that probing hundreds of lists needs.
    ivf = f"IVF{nlist}"
    candidates = (
        [f"{ivf},PQ{m}x4fs,Refine(SQ6)" for m in (dim // 4, dim // 8)]
        + [f"{ivf},SQ6"]
        + [f"OPQ{code}_{dim},{ivf},PQ{code}x8" for code in (dim // 4, dim // 8, dim // 16) if code >= 4]
    )
    for candidate in (c for c in candidates if mergeable(c) or not merge):
        per_vector = index_bytes(candidate, 1, dim) - index_bytes(candidate, 0, dim)  # codes + id
        if per_vector <= dim and index_bytes(candidate, count, dim) <= max_bytes:  # dim bytes: ¼ of flat's
            return candidate
    smallest = index_bytes(candidates[-1], count, dim)
    raise UserError(
        f"{count} vectors of {dim} dimensions need at least {smallest / 2**20:.0f} MiB; raise --max-index-memory"
    )


def fallback_for(index_type: str) -> str | None:
    """What auto builds instead when a refined index misses the recall target: 6-bit codes of
    each vector's residual to its list, on the same lists. Residuals span a smaller range than
    whole vectors, so these codes rank more precisely (tight clusters need it); they scan slower."""
    return index_type.split(",")[0] + ",SQ6" if ",Refine(" in index_type else None


def shortfall(
    tuning: Tuning,
    index_type: str,
    auto_picked: bool,
    count: int,
    dim: int,
    max_bytes: int,
    merge: bool = False,
    servers: int = 1,
) -> str:
    """Empty when the build met its recall target; else which index missed it by how much, and what
    would reach it where something would. `auto_picked`: auto chose index_type within `max_bytes` per
    server (`servers` shards share the index); `merge`: the build's form (on disk, in shards, from
    parts) admits only types that merge, so neither flat nor HNSW can be suggested."""
    if tuning.target_met:
        return ""
    missed = f"{index_type} recall@{tuning.k} {tuning.recall_at_k:.3f} is below the target {tuning.target}"
    if auto_picked:
        remedy = _remedy(index_type, count, dim, max_bytes, merge, servers)
    else:
        remedy = "pick another --index-type" + ("" if merge else " (flat is exact)")
    return f"{missed}; {remedy}" if remedy else missed


def _remedy(index_type: str, count: int, dim: int, max_bytes: int, merge: bool, servers: int) -> str:
    """Auto's pick grows with the budget, up to the one it picks with no limit (among the types
    that merge, where the build's form needs them): only the budget kept it from that one, so more
    memory helps unless auto built it (or measured and rejected it, refined), or the budget it needs
    is no more than the one allowed (a build on disk keeps its lists out of memory: auto picked
    as if unlimited). Then nothing auto would build does better (flat is exact, but auto spares
    this many vectors the time of exhaustive search)."""
    unlimited = choose_index_type(count, dim, 1 << 62, merge)
    needed = math.ceil(index_bytes(unlimited, count, dim) / servers)  # each server holds its shard
    if index_type in (unlimited, fallback_for(unlimited)) or needed <= max_bytes:
        return ""
    return f"allow more memory: --max-index-memory {math.ceil(needed / 2**20)}M lets auto pick {unlimited}"


def nlist_of(index) -> int | None:
    """The inverted lists of an IVF index (through an OPQ wrapper), None for flat and HNSW."""
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None


def _hnsw_quantizer(index) -> bool:
    """Whether an IVF index finds its lists through an HNSW graph over the centroids."""
    import faiss

    return hasattr(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), "hnsw")


def _hnsw_of(index):
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    return inner if hasattr(inner, "hnsw") else None


def _refine_of(index):
    """The IndexRefine whose codes re-rank a shortlist, or None."""
    import faiss

    return index if isinstance(index, faiss.IndexRefine) else None


def candidate_parameters(index) -> list[dict]:
    """Knob settings from cheapest to most thorough; [{}] for an exact index."""
    nlist = nlist_of(index)
    if nlist is not None:
        graph = _hnsw_quantizer(index)
        refine = {"k_factor_rf": REFINE_K_FACTOR} if _refine_of(index) is not None else {}
        return [
            {"nprobe": n} | ({"quantizer_efSearch": max(64, 2 * n)} if graph else {}) | refine
            for n in NPROBES
            if n <= nlist
        ]
    if _hnsw_of(index) is not None:
        return [{"efSearch": ef} for ef in EF_SEARCHES]
    return [{}]


def apply_parameters(index, params: dict) -> None:
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def search_parameters(index, params: dict, selector=None, effort: int = 1):
    """SearchParameters carrying the build's knobs (times `effort`) and an IDSelector.

    FAISS ignores the index's own nprobe/efSearch once parameters are passed, so they are restated.
    """
    import faiss

    refine = _refine_of(index)
    if refine is not None:  # the shortlist comes from the base index, which applies the selector
        inner, exhaustive = search_parameters(faiss.downcast_index(refine.base_index), params, selector, effort)
        found = faiss.IndexRefineSearchParameters(k_factor=params.get("k_factor_rf", 1), base_index_params=inner)
        found.keep = inner  # the C++ side holds a bare pointer: keep the Python object alive with it
        return found, exhaustive
    nlist = nlist_of(index)
    if nlist is not None:
        nprobe = min(nlist, params.get("nprobe", 1) * effort)
        found = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if _hnsw_quantizer(index):
            quantizer = faiss.SearchParametersHNSW(efSearch=max(params.get("quantizer_efSearch", 64), 2 * nprobe))
            found.quantizer_params = quantizer
            found.keep = quantizer
        return found, nprobe >= nlist
    if _hnsw_of(index) is not None:
        ef = params.get("efSearch", 16) * effort
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ef), ef >= index.ntotal
    return faiss.SearchParameters(sel=selector), True


def _parts(index) -> tuple:
    """(the index that finds candidates, the flat codes that re-rank them or None)."""
    import faiss

    refine = _refine_of(index)
    if refine is None:
        return index, None
    return faiss.downcast_index(refine.base_index), faiss.downcast_index(refine.refine_index)


def replaceable(index) -> bool:
    """Whether `replace_vectors` can give stored ids new vectors (an HNSW graph cannot remove)."""
    import faiss

    base, _ = _parts(index)
    return isinstance(base, faiss.IndexFlatCodes) or nlist_of(base) is not None


def replace_vectors(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Give these faiss_ids new vectors, keeping their ids (the index must be `replaceable`).

    Flat and scalar codes are overwritten in place; an IVF index removes the ids and adds them
    again; a refined index does both, to its shortlist codes and to its re-ranking codes."""
    import faiss

    base, refine = _parts(index)
    if isinstance(base, faiss.IndexFlatCodes):
        _overwrite_codes(base, ids, vectors)
    else:
        base.remove_ids(faiss.IDSelectorBatch(ids))
        base.add_with_ids(vectors, ids)
    if refine is not None:
        _overwrite_codes(refine, ids, vectors)


def _overwrite_codes(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """A flat-codes index stores vector i's code at row i: encode the new vectors into those rows."""
    import faiss

    codes = faiss.rev_swig_ptr(index.codes.data(), index.ntotal * index.code_size)
    codes.reshape(index.ntotal, index.code_size)[ids] = index.sa_encode(vectors)


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
