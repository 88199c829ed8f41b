"""A query's parts: Terms (a text, an image, an indexed media_id, a vector, each weighted) and the one
vector per query they combine into."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..images import open_query_image
from ..model import ClipModel
from .builds import Build
from .collapse import stored_vectors
from .mapping import ABSENT

TERM_KINDS = ("text", "image", "media_id", "vector")


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of a combined query: a text, an image (path or bytes), an indexed media_id (its
    stored vector is reused) or a query vector, with a weight; a negative weight subtracts it."""

    kind: str
    value: str | Path | bytes | np.ndarray
    weight: float = 1.0

    @classmethod
    def parse(cls, kind: str, written: str, sign: float = 1.0) -> Term:
        """rclip's weighted form: '2:red car' is text 'red car' with weight 2 (times sign)."""
        weight, value = 1.0, written
        head, colon, rest = written.partition(":")
        if colon and rest:
            try:
                weight, value = float(head), rest
            except ValueError:
                pass  # a colon that is part of the text or path
        return cls(kind, value, sign * weight)

    @property
    def title(self) -> str:
        """The term as a person reads it in a query's title: `+ 'red car'`, `- 2×image a.jpg`."""
        shown = {"text": repr(self.value), "image": f"image {self.value}", "media_id": f"like {str(self.value)[:12]}"}
        sign, weight = "+" if self.weight > 0 else "-", abs(self.weight)
        return f"{sign} {'' if weight == 1 else f'{weight:g}×'}{shown.get(self.kind, self.kind)}"


class NotIndexedError(UserError):
    """A media_id the build does not hold."""


def stored_vector(build: Build, media_id: str) -> np.ndarray:
    """The indexed vector of a media_id, reused instead of decoding and encoding its image again."""
    position = int(build.mapping.faiss_ids([media_id])[0])
    if position == ABSENT:
        raise NotIndexedError(f"media_id {media_id} is not in build {build.build_id}")
    return stored_vectors(build.knn, [position])[0]


def query_vectors(model: ClipModel, build: Build, queries: list[list[Term]], notes: list[list[str]]) -> np.ndarray:
    """One vector per query: texts in one encoder batch, images decoded and encoded, media_ids
    read back from the index, vectors taken as given. A text longer than the model reads
    adds a note to its query's `notes`."""
    texts: dict[str, np.ndarray] = {}
    for note, terms in zip(notes, queries):
        if not terms:
            raise UserError("give at least one query term (text, image or media_id)")
        for term in terms:
            if term.kind not in TERM_KINDS:
                raise UserError(f"unknown query term kind {term.kind!r}; use one of {', '.join(TERM_KINDS)}")
            if term.kind == "text":
                text = str(term.value).strip()
                if not text:
                    raise UserError("the query is empty; give some words to search for")
                tokens, limit = model.token_count(text), model.context_length
                if tokens > limit:
                    note.append(f"query truncated to the model's {limit} tokens (it has {tokens})")
                texts[text] = None
    if texts:
        texts = dict(zip(texts, model.encode_texts(list(texts))))

    def vector(term: Term) -> np.ndarray:
        if term.kind == "text":
            return texts[str(term.value).strip()]
        if term.kind == "image":
            return model.encode_images([open_query_image(term.value)])[0]
        if term.kind == "media_id":
            return stored_vector(build, str(term.value))
        return np.asarray(term.value, dtype=np.float32)

    combined = []
    for terms in queries:
        if len(terms) == 1 and terms[0].weight == 1.0:
            combined.append(vector(terms[0]))
            continue
        total = np.sum([term.weight * vector(term) for term in terms], axis=0)
        norm = float(np.linalg.norm(total))
        if not norm >= 1e-6:
            raise UserError("the query terms cancel out; change their weights")
        combined.append(total / norm)
    dim = build.knn.d
    if any(v.shape != (dim,) for v in combined):
        raise UserError(f"a query vector needs {dim} numbers, the dimension of build {build.build_id}")
    return np.ascontiguousarray(np.stack(combined) if combined else np.zeros((0, dim)), np.float32)
