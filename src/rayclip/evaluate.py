"""Recall@K through the real pipeline: the published index, the Searcher, the mapping.

Definition. The queries are the distinct captions of the evaluated images. Text→image: a
caption's query is a hit at K when any of the top K images carries that caption (several images
may share one). Image→text: an image is a hit at K when one of its captions is among the K
captions closest to its vector. Chance level is reported beside each figure.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from . import layout
from .ingest import read_manifest
from .progress import Progress
from .search import Searcher


@dataclasses.dataclass
class EvalReport:
    model_version: str
    build_id: str
    images: int
    queries: int
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    path: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _chance(gallery: int, relevant: list[int], k: int) -> float:
    """Expected text→image recall@k of a random ranking: 1 - C(N-r, k) / C(N, k), averaged."""
    return float(np.mean([1 - math.comb(gallery - r, k) / math.comb(gallery, k) for r in relevant]))


def evaluate(
    searcher: Searcher,
    urls: list[str] | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    progress: Progress | None = None,
) -> EvalReport:
    """Recall@K over the indexed images ingested from `urls` (all indexed images when None).

    progress(done, total) counts queries answered: captions (text→image), then images (image→text).
    """
    mapping = searcher.mapping.select(["faiss_id", "media_id"]).to_pylist()
    indexed = {row["media_id"]: row["faiss_id"] for row in mapping}
    rows = read_manifest(searcher.root, ["media_id", "url", "caption"]).to_pylist()
    wanted = set(urls) if urls is not None else None
    rows = [r for r in rows if r["media_id"] in indexed and (wanted is None or r["url"] in wanted) and r["caption"]]
    captions = sorted({r["caption"] for r in rows})
    images_by_caption: dict[str, set[str]] = {c: set() for c in captions}
    captions_by_image: dict[str, set[str]] = {}
    for r in rows:
        images_by_caption[r["caption"]].add(r["media_id"])
        captions_by_image.setdefault(r["media_id"], set()).add(r["caption"])

    k_max = max(ks)
    text_vectors = searcher.model.encode_texts(captions)  # once, for both directions
    hits_t2i = {k: 0 for k in ks}
    for caption, results in zip(captions, searcher.search_vectors(text_vectors, k=k_max)):
        ranked = [r.media_id for r in results]
        for k in ks:
            hits_t2i[k] += bool(images_by_caption[caption] & set(ranked[:k]))

    image_ids = sorted(captions_by_image)
    total = len(captions) + len(image_ids)
    if progress:
        progress(len(captions), total)
    image_vectors = searcher.vectors([indexed[m] for m in image_ids])
    order = np.argsort(-(image_vectors @ text_vectors.T), axis=1)[:, :k_max]
    hits_i2t = {k: 0 for k in ks}
    for media_id, top in zip(image_ids, order):
        for k in ks:
            hits_i2t[k] += bool(captions_by_image[media_id] & {captions[j] for j in top[:k]})
    if progress:
        progress(total, total)

    gallery = searcher.info["count"]
    relevant = [len(images_by_caption[c]) for c in captions]
    return EvalReport(
        model_version=searcher.model_version,
        build_id=searcher.info["build_id"],
        images=len(image_ids),
        queries=len(captions),
        text_to_image={k: round(hits_t2i[k] / len(captions), 4) for k in ks},
        image_to_text={k: round(hits_i2t[k] / len(image_ids), 4) for k in ks},
        chance_text_to_image={k: round(_chance(gallery, relevant, k), 4) for k in ks},
    )


def save(root: Path, report: EvalReport) -> EvalReport:
    """Write eval.json next to the build it measured."""
    path = layout.build_dir(root, report.model_version, report.build_id) / "eval.json"
    report.path = str(path)
    layout.write_json_atomic(path, report.to_dict())
    return report
