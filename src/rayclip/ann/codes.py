"""Giving stored ids new vectors in a built index, in place where its codes allow."""

from __future__ import annotations

import numpy as np

from .knobs import nlist_of, refine_of


def _parts(index) -> tuple:
    """(the index that finds candidates, the flat codes that re-rank them or None)."""
    import faiss

    refine = refine_of(index)
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
