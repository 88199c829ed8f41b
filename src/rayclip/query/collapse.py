"""Near-duplicate collapse: search deeper until the hits form k groups of near-duplicates, and the
stored vectors it (and a media_id term) reads back from a build."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .knn import LocalIndex, ShardedIndex

COLLAPSE_DEPTH = 4  # candidates fetched per wanted group, multiplied again while groups are short


def collapsed(
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
        leaders, folded = group_near_duplicates(stored_vectors(index, ids), threshold)
        if len(leaders) >= k or depth >= total:
            break
        depth = min(total, depth * COLLAPSE_DEPTH)
    leaders, folded = leaders[:k], folded[:k]
    return scores[leaders], ids[leaders], folded


def stored_vectors(index: LocalIndex | ShardedIndex, ids) -> np.ndarray:
    """The indexed vectors of these faiss_ids, each L2-normalised: the index's own reconstruction
    (exact for a flat index, an approximation for a compressed one), scaled back to unit length so
    that inner products stay cosines. The one way anything reads vectors back from a build."""
    vectors = index.vectors(np.asarray(ids, dtype=np.int64))
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def group_near_duplicates(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
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
