"""Searching the caption index: each caption found names the images that carry it."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import UserError
from . import knn
from .builds import Build
from .collapse import collapsed
from .results import SearchResult


def caption_hits(
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
        scores, found, folded = collapsed(captions.index, search, query, depth, collapse, rows)
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
