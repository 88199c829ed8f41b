"""A built index's query-time knobs (nprobe, efSearch, the refine shortlist): which settings to try,
setting them on the index, and restating them as SearchParameters for a filtered search."""

from __future__ import annotations

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)
REFINE_K_FACTOR = 32  # a refined index re-ranks a shortlist of this many times k


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


def refine_of(index):
    """The IndexRefine whose codes re-rank a shortlist, or None."""
    import faiss

    return index if isinstance(index, faiss.IndexRefine) else None


def candidate_parameters(index) -> list[dict]:
    """Knob settings from cheapest to most thorough; [{}] for an exact index."""
    nlist = nlist_of(index)
    if nlist is not None:
        graph = _hnsw_quantizer(index)
        refine = {"k_factor_rf": REFINE_K_FACTOR} if refine_of(index) is not None else {}
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

    refine = refine_of(index)
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
