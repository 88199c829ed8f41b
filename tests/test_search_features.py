"""Search features over a real FAISS build: near-duplicate collapse (filters, combined queries follow)."""

from __future__ import annotations

import numpy as np
import pytest
from silver_helpers import media_ids, normalised, write_silver

from rayclip import index
from rayclip.search import DEFAULT_COLLAPSE, Searcher


@pytest.fixture(scope="module")
def near_duplicates(tmp_path_factory):
    """40 unrelated vectors; vector i has i % 4 near-copies (cosine ~0.99), vector 0 has 30."""
    rng = np.random.default_rng(3)
    bases = normalised(rng.standard_normal((40, 128)))
    copies = [30] + [i % 4 for i in range(1, 40)]
    vectors, group = [], []
    for g, (base, n) in enumerate(zip(bases, copies)):
        for _ in range(n + 1):
            vectors.append(base + rng.standard_normal(128) * 0.01)
            group.append(g)
    order = rng.permutation(len(vectors))  # groups scattered over the file, not in runs
    root = tmp_path_factory.mktemp("dups") / "data"
    ids = media_ids(len(vectors))
    write_silver(root, "2026-01-01", ids, np.asarray(vectors)[order])
    index.build(root)
    group_of = dict(zip(ids, np.asarray(group)[order]))
    return Searcher.open(root), bases, group_of, copies


def test_collapse_returns_k_distinct_groups_with_folded_counts(near_duplicates):
    searcher, bases, group_of, copies = near_duplicates
    query = normalised((bases[0] + 0.6 * bases[5] + 0.5 * bases[9])[None])
    plain = searcher.search_vectors(query, k=8)[0]
    assert [group_of[r.media_id] for r in plain] == [0] * 8 and all(r.duplicates == 0 for r in plain)

    folded = searcher.search_vectors(query, k=8, collapse=DEFAULT_COLLAPSE)[0]
    groups = [group_of[r.media_id] for r in folded]
    assert len(folded) == 8 and len(set(groups)) == 8  # searched past the 31 copies of group 0
    # Brute force: groups ranked by their best member's cosine to the query.
    best = {}
    vectors = searcher.vectors(list(range(searcher.info["count"])))
    for faiss_id, score in enumerate(vectors @ query[0]):
        g = group_of[searcher.mapping.column("media_id")[faiss_id].as_py()]
        best[g] = max(best.get(g, -2.0), float(score))
    assert groups == sorted(best, key=best.get, reverse=True)[:8]
    assert folded[0].media_id == plain[0].media_id and folded[0].duplicates == copies[0]
    assert [r.rank for r in folded] == list(range(1, 9))
    assert all(r.duplicates <= copies[g] for r, g in zip(folded, groups))
    assert folded[0].to_dict()["duplicates"] == copies[0]


def test_collapse_threshold_one_folds_nothing_but_exact_copies(near_duplicates):
    searcher, bases, group_of, _ = near_duplicates
    results = searcher.search_vectors(bases[:1], k=5, collapse=1.0)[0]
    assert [group_of[r.media_id] for r in results] == [0] * 5 and all(r.duplicates == 0 for r in results)


def test_bad_collapse_threshold_is_a_user_error(near_duplicates):
    from rayclip import UserError

    with pytest.raises(UserError, match="not a cosine"):
        near_duplicates[0].search_vectors(near_duplicates[1][:1], k=3, collapse=1.5)
