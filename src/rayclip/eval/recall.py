"""Recall@K through the real pipeline: the published index, the Searcher, the mapping.

Two definitions, kept apart and labelled in every report:

- `--dataset karpathy|coco` (a retrieval benchmark's annotation file): clip_benchmark's, the one
  behind open_clip's published table (LAION-AI/CLIP_benchmark, clip_benchmark/metrics/
  zeroshot_retrieval.py). Every caption is one query whose only positive is its own image;
  text→image R@K is the share of captions whose image is in the top K images; image→text R@K is
  the share of images with at least one of their captions in the top K captions. Both rank the
  whole (captions × images) cosine matrix of the evaluated set.
- `--metadata` (LAION-style, one caption per row): rayclip's own. The queries are the distinct
  captions; a text→image query is a hit when any of the top K images carries that caption
  (several images may share one). Image→text: one of the image's captions is among the K captions
  closest to its vector.

Both definitions score both directions from one matrix: the captions, encoded in batches by the
build's model, against the build's own vectors (Searcher.vectors: what FAISS searches, normalised),
ranked with `first_hit_ranks` (equal scores in faiss_id order, as FAISS returns them). For a flat
index that is exactly the ranking search serves.

Chance level is reported beside each figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..options import EvalOptions
from ..progress import Progress
from ..query.mapping import ABSENT
from ..query.searcher import Searcher
from ..store import catalog, layout, storage
from .annotations import AnnotatedImage

METADATA_DEFINITION = "rayclip metadata: distinct captions; a hit is any image carrying the caption"
BENCHMARK_DEFINITION = "clip_benchmark zeroshot_retrieval: each caption's own image; any of an image's captions"
CURVE_MAX_K = 50  # the report's Recall@K curves run from K=1 to this (or the gallery size)
WORST_SHOWN = 8  # worst-ranked queries per direction in the HTML report
RANK_CHUNK = 1024  # query rows ranked at a time: bounds the temporaries on COCO-5k (25k x 5k)
TEXT_BATCH = 256


@dataclasses.dataclass
class EvalReport:
    model_version: str
    build_id: str
    images: int
    queries: int
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    definition: str = METADATA_DEFINITION
    path: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _chance(gallery: int, relevant: list[int], k: int) -> float:
    """Expected recall@k of a random ranking: 1 - C(N-r, k) / C(N, k), averaged over the queries."""
    k = min(k, gallery)  # a K beyond the gallery finds everything
    counts = Counter(relevant)  # a few distinct r: the big binomials are computed once each
    hit = {r: 1 - math.comb(gallery - r, k) / math.comb(gallery, k) for r in counts}
    return float(sum(hit[r] * n for r, n in counts.items()) / len(relevant))


def evaluate(
    searcher: Searcher,
    urls: list[str] | None = None,
    ks: tuple[int, ...] = EvalOptions.recall_at,
    progress: Progress | None = None,
) -> EvalReport:
    """Recall@K over the indexed images ingested from `urls` (all indexed images when None).

    Text→image ranks every image of the build for each distinct caption; image→text ranks the
    captions for each evaluated image; both read the same (captions x images) score matrix.
    progress(done, total) counts queries answered: captions (text→image), then images (image→text).
    """
    build = searcher.snapshot()  # one build for the whole evaluation
    rows = catalog.read_manifest(searcher.root, ["media_id", "url", "caption"]).to_pylist()
    wanted = set(urls) if urls is not None else None
    rows = [r for r in rows if (wanted is None or r["url"] in wanted) and r["caption"]]
    found = build.mapping.faiss_ids([r["media_id"] for r in rows])
    rows = [r | {"faiss_id": int(f)} for r, f in zip(rows, found) if f != ABSENT]
    captions = sorted({r["caption"] for r in rows})
    caption_ids = {c: i for i, c in enumerate(captions)}
    carries = np.zeros((len(captions), build.info.count), dtype=bool)  # caption i is on image j
    for r in rows:
        carries[caption_ids[r["caption"]], r["faiss_id"]] = True

    scores = _encode_texts(searcher, captions) @ searcher.vectors(np.arange(build.info.count)).T
    text_to_image = first_hit_ranks(scores, carries)
    image_ids = np.unique([r["faiss_id"] for r in rows])
    total = len(captions) + len(image_ids)
    if progress:
        progress(len(captions), total)
    image_to_text = first_hit_ranks(scores.T[image_ids], carries.T[image_ids])
    if progress:
        progress(total, total)

    relevant = carries.sum(axis=1).tolist()
    return EvalReport(
        model_version=searcher.model_version,
        build_id=build.build_id,
        images=len(image_ids),
        queries=len(captions),
        text_to_image=recall_at(text_to_image, ks),
        image_to_text=recall_at(image_to_text, ks),
        chance_text_to_image={k: round(_chance(build.info.count, relevant, k), 4) for k in ks},
    )


def save(root: Path, report: EvalReport | BenchmarkReport) -> EvalReport | BenchmarkReport:
    """Write eval.json next to the build it measured."""
    path = layout.eval_file(layout.build_dir(root, report.model_version, report.build_id))
    report.path = str(path)
    storage.write_json_atomic(path, report.to_dict())
    return report


@dataclasses.dataclass
class Gallery:
    """The evaluated set as the store sees it: one image per media_id; every caption, in order."""

    media_ids: list[str]
    files: list[Path]  # the first annotated file of each media_id
    captions: list[str]
    text_image: np.ndarray  # caption i describes media_ids[text_image[i]]
    duplicate_files: int  # annotated files whose bytes an earlier file already had


def gallery(annotated: list[AnnotatedImage]) -> Gallery:
    """Map each file to its media_id (the sha256 of its bytes, as the store names it)."""
    position: dict[str, int] = {}
    files, captions, owners = [], [], []
    for item in annotated:
        media_id = hashlib.sha256(item.file.read_bytes()).hexdigest()
        if media_id not in position:
            position[media_id] = len(position)
            files.append(item.file)
        captions.extend(item.captions)
        owners.extend([position[media_id]] * len(item.captions))
    return Gallery(list(position), files, captions, np.array(owners, dtype=np.int64), len(annotated) - len(position))


# ---------------------------------------------------------------- clip_benchmark's Recall@K


def first_hit_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """For each row (a query), the 1-based rank of its best-ranked positive column.

    Columns rank by descending score; equal scores rank by lower column index, the order FAISS
    returns. clip_benchmark takes torch.topk, which leaves the order of equal scores unspecified:
    ours is one of the orders it may return, and with no exact ties (real embeddings) the two agree.
    Recall@K is the share of rows whose rank is at most K. Every row needs a positive.
    """
    ranks = np.empty(len(scores), dtype=np.int64)
    columns = np.arange(scores.shape[1])
    for start in range(0, len(scores), RANK_CHUNK):
        s = np.asarray(scores[start : start + RANK_CHUNK])
        p = positive[start : start + RANK_CHUNK]
        best = np.where(p, s, -np.inf).max(axis=1, keepdims=True)
        first = np.argmax(p & (s == best), axis=1)[:, None]  # the lowest-index positive with that score
        ahead = (s > best) | ((s == best) & (columns < first))
        ranks[start : start + RANK_CHUNK] = 1 + ahead.sum(axis=1)
    return ranks


@dataclasses.dataclass
class Ranks:
    text_to_image: np.ndarray  # per caption: the rank of its own image among the images
    image_to_text: np.ndarray  # per queried image: the rank of its best caption among the captions
    image_queries: np.ndarray  # the images queried: those with at least one caption


def retrieval_ranks(scores: np.ndarray, text_image: np.ndarray) -> Ranks:
    """clip_benchmark's two directions over one (captions x images) score matrix.

    An image without captions stays in the gallery but asks no image→text query (clip_benchmark
    would count it a miss: its recall is 0/0).
    """
    n_images = scores.shape[1]
    positive = text_image[:, None] == np.arange(n_images)[None, :]
    queried = np.unique(text_image)
    everyone = len(queried) == n_images  # the usual case; skips copying the transposed matrix
    image_rows = scores.T if everyone else scores.T[queried]
    image_positive = positive.T if everyone else positive.T[queried]
    return Ranks(first_hit_ranks(scores, positive), first_hit_ranks(image_rows, image_positive), queried)


def recall_at(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    return {k: round(float(np.mean(ranks <= k)), 4) for k in ks}


# ---------------------------------------------------------------- the benchmark through the pipeline


@dataclasses.dataclass
class BenchmarkReport:
    model_version: str
    build_id: str
    images: int
    captions: int
    images_without_captions: int
    duplicate_files: int
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    chance_image_to_text: dict[int, float]
    curve: dict[str, list]  # k, and recall and chance per direction at each k
    worst: dict[str, list]  # the worst-ranked queries of each direction with their top results
    dataset: str = ""
    annotations: str = ""
    split: str | None = None
    definition: str = BENCHMARK_DEFINITION
    source: str = "LAION-AI/CLIP_benchmark: clip_benchmark/metrics/zeroshot_retrieval.py"
    path: str = ""
    html: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _encode_texts(searcher: Searcher, texts: list[str]) -> np.ndarray:
    """The captions by the build's model, TEXT_BATCH at a time (one batched encode, both directions)."""
    batches = [searcher.model.encode_texts(texts[i : i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)]
    return np.concatenate(batches) if batches else np.zeros((0, searcher.build_info.dim), np.float32)


def _indexed(searcher: Searcher, media_ids: list[str]) -> tuple[list[int], list[str]]:
    """faiss_id and store path of each media_id; every evaluated image must be in the build."""
    build = searcher.snapshot()
    faiss_ids = build.mapping.faiss_ids(media_ids)
    missing = [m for m, f in zip(media_ids, faiss_ids) if f == ABSENT]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(media_ids)} evaluated images are not in build {build.build_id} "
            f"(undecodable or failed to embed; see the ingest and embed summaries), e.g. media_id {missing[0]}"
        )
    return faiss_ids.tolist(), [row["path"] for row in build.mapping.rows(faiss_ids, ["path"])]


def _worst(scores: np.ndarray, ranks: Ranks, evaluated: Gallery, paths: list[str], top: int = 5) -> dict[str, list]:
    """The worst-ranked queries of each direction, with what ranked above the right answer."""
    image = [{"media_id": m, "path": p} for m, p in zip(evaluated.media_ids, paths)]
    by_text = []
    for t in np.argsort(-ranks.text_to_image, kind="stable")[:WORST_SHOWN]:
        own = int(evaluated.text_image[t])
        ranked = np.argsort(-scores[t], kind="stable")[:top]
        results = [image[j] | {"score": round(float(scores[t, j]), 4), "hit": bool(j == own)} for j in ranked]
        by_text.append(
            {"caption": evaluated.captions[t], "rank": int(ranks.text_to_image[t]), "image": image[own], "top": results}
        )
    by_image = []
    for q in np.argsort(-ranks.image_to_text, kind="stable")[:WORST_SHOWN]:
        i = int(ranks.image_queries[q])
        ranked = np.argsort(-scores[:, i], kind="stable")[:top]
        results = [
            {
                "caption": evaluated.captions[j],
                "score": round(float(scores[j, i]), 4),
                "hit": bool(evaluated.text_image[j] == i),
            }
            for j in ranked
        ]
        own = [c for c, owner in zip(evaluated.captions, evaluated.text_image) if owner == i]
        by_image.append({"image": image[i], "rank": int(ranks.image_to_text[q]), "captions": own, "top": results})
    return {"text_to_image": by_text, "image_to_text": by_image}


def score_benchmark(
    searcher: Searcher, evaluated: Gallery, ks: tuple[int, ...] = EvalOptions.recall_at
) -> BenchmarkReport:
    """clip_benchmark's Recall@K of the published build: its vectors, its model for the captions."""
    faiss_ids, paths = _indexed(searcher, evaluated.media_ids)
    scores = _encode_texts(searcher, evaluated.captions) @ searcher.vectors(faiss_ids).T
    ranks = retrieval_ranks(scores, evaluated.text_image)
    n_images, n_texts = len(evaluated.media_ids), len(evaluated.captions)
    per_image = np.bincount(evaluated.text_image, minlength=n_images)[ranks.image_queries].tolist()

    def chance(direction: str, k: int) -> float:
        if direction == "text_to_image":  # one positive image per caption
            return round(_chance(n_images, [1] * n_texts, k), 4)
        return round(_chance(n_texts, per_image, k), 4)

    curve_ks = list(range(1, min(CURVE_MAX_K, n_images, n_texts) + 1))
    curve: dict[str, list] = {"k": curve_ks}
    for direction, r in (("text_to_image", ranks.text_to_image), ("image_to_text", ranks.image_to_text)):
        curve[direction] = list(recall_at(r, tuple(curve_ks)).values())
        curve[f"chance_{direction}"] = [chance(direction, k) for k in curve_ks]
    return BenchmarkReport(
        model_version=searcher.model_version,
        build_id=searcher.build_info.build_id,
        images=n_images,
        captions=n_texts,
        images_without_captions=n_images - len(ranks.image_queries),
        duplicate_files=evaluated.duplicate_files,
        text_to_image=recall_at(ranks.text_to_image, ks),
        image_to_text=recall_at(ranks.image_to_text, ks),
        chance_text_to_image={k: chance("text_to_image", k) for k in ks},
        chance_image_to_text={k: chance("image_to_text", k) for k in ks},
        curve=curve,
        worst=_worst(scores, ranks, evaluated, paths),
    )


@contextlib.contextmanager
def staged_links(evaluated: Gallery):
    """A temporary folder of links to the evaluated files (one per media_id), each with its first
    caption as the sidecar the folder ingest reads; the rest of the images folder stays out."""
    first_caption = {int(owner): c for owner, c in reversed(list(zip(evaluated.text_image, evaluated.captions)))}
    with storage.scratch_folder("rayclip-eval-") as folder:
        for i, file in enumerate(evaluated.files):
            link = folder / f"{i:08d}-{file.name}"  # numbered: files of different subfolders may share a name
            storage.link(file, link)
            if i in first_caption:
                storage.write_atomic(link.with_suffix(".txt"), first_caption[i] + "\n")
        yield folder


def save_benchmark(
    root: Path, report: BenchmarkReport, dataset: str, annotations: Path, split: str | None
) -> BenchmarkReport:
    """Name the set the report scored, then write eval.json and eval.html next to the build."""
    from . import html

    report.dataset, report.annotations = dataset, annotations.name
    report.split = None if dataset == "coco" else split or "test"
    report.html = str(html.write(root, report))
    return save(root, report)
