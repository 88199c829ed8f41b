"""What a query returns: one SearchResult per hit, in a SearchResults list that names the build it
came from, and the join of FAISS hits with that build's mapping."""

from __future__ import annotations

import dataclasses

import numpy as np

from .builds import Build


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


def join(build: Build, scores: np.ndarray, ids: np.ndarray) -> list[SearchResult]:
    """One SearchResult per hit, its media_id, path, url and caption read from the build's mapping."""
    keep = ids >= 0  # FAISS pads with -1 when fewer than k results exist
    rows = build.mapping.rows(ids[keep], ["media_id", "path", "url", "caption"])
    return [
        SearchResult(rank=r + 1, score=round(float(s), 6), **row, faiss_id=int(i))
        for r, (s, i, row) in enumerate(zip(scores[keep], ids[keep], rows))
    ]
