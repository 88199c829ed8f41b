"""Builds in the other forms for the serving tests: the same index as a data root's CURRENT build,
built again into a copy of the root by `rayclip index` itself (--shards K, or --on-disk), so every
form searches the same trained quantizer with the same tuned knobs."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayclip.stages import index
from rayclip.store import catalog, storage

SCORE_KEYS = ("score", "similarity")  # rayclip's answers, clip-retrieval's /knn-service
# Two scores a float bit apart print at most one unit of the sixth decimal apart; two units never pass.
SCORE_ROUNDING = 1.5e-6


def rebuild(
    root: Path, model_version: str, build_id: str, shards: int = 1, on_disk: bool = False, part_vectors: int = 0
) -> str:
    """Build `build_id`'s index again in `root` and publish it, in shards (each a part of the rows,
    unless `part_vectors` says otherwise) or merged on disk; returns the new build's id."""
    info = catalog.build_info(storage.data_root(root), model_version, build_id)
    return index.build(
        root,
        model_version,
        index_type=info.index_type,
        target_recall=info.recall["target"],
        retrain=True,
        parallel="local",
        part_vectors=part_vectors or math.ceil(info.count / max(shards, 2)),
        shards=shards,
        on_disk=on_disk,
    ).build_id


def rebuilt_copy(root: Path, copy: Path, model_version: str, build_id: str, shards: int = 1, on_disk: bool = False):
    """A copy of a data root whose CURRENT is build `build_id`'s index built again (rebuild); returns the copy."""
    shutil.copytree(root, copy)
    rebuild(copy, model_version, build_id, shards, on_disk)
    return copy


def sharded_copy(root: Path, copy: Path, model_version: str, build_id: str, shards: int = 2) -> Path:
    """A copy of a data root whose CURRENT is the same index kept in `shards` shards."""
    return rebuilt_copy(root, copy, model_version, build_id, shards=shards)


def ondisk_copy(root: Path, copy: Path, model_version: str, build_id: str) -> Path:
    """A copy of a data root whose CURRENT is the same index merged on disk (index.faiss + index.ivfdata)."""
    return rebuilt_copy(root, copy, model_version, build_id, on_disk=True)


@dataclass(frozen=True)
class WholeAndSharded:
    """A small IVF build, and the same index kept in 2 shards in a copy of its data root."""

    root: Path  # the data root whose CURRENT build is one index
    sharded_root: Path  # a copy of it whose CURRENT is the same index in 2 shards
    report: object  # rayclip.stages.index.BuildReport of the build in `root`


def whole_and_sharded(folder: Path, index_type: str = "IVF64,Flat") -> WholeAndSharded:
    """a_build in folder/data, and its sharded_copy in folder/sharded."""
    root = folder / "data"
    report = a_build(root, index_type=index_type)
    return WholeAndSharded(root, sharded_copy(root, folder / "sharded", report.model_version, report.build_id), report)


def a_build(root: Path, n: int = 4000, index_type: str = "IVF64,Flat"):
    """A small IVF build of clustered vectors with a manifest (so --where has columns to filter)."""
    from helpers.silver import clustered, media_ids, write_manifest, write_silver
    from rayclip.stages import index

    ids = media_ids(n)
    write_silver(root, "2026-01-01", ids, clustered(n, seed=3))
    write_manifest(root, ids)
    return index.build(root, index_type=index_type, target_recall=0.9)


def query_answers(client, media_id: str, **headers) -> dict:
    """The answer of every query route to one set of queries (plain, --where, collapse, arithmetic,
    a stored vector, clip-retrieval's /knn-service), by route."""
    import json

    where, text = "width >= 512 AND caption LIKE '%dog%'", "a photo of a dog"
    terms = [{"text": text}, {"media_id": media_id, "weight": -0.5}]
    front = {"text": text, "modality": "image", "num_images": 20, "indice_name": "", "deduplicate": False}
    asked = {
        "search": ("GET", "/api/search", {"params": {"q": text, "k": 20}}),
        "where": ("GET", "/api/search", {"params": {"q": text, "k": 20, "where": where}}),
        "collapse": ("GET", "/api/search", {"params": {"q": text, "k": 20, "collapse": 0.85}}),
        "where+collapse": ("GET", "/api/search", {"params": {"q": text, "k": 10, "collapse": 0.85, "where": where}}),
        "arithmetic": ("POST", "/api/search", {"json": {"terms": terms, "k": 20, "where": where}}),
        "similar": ("GET", "/api/search/similar", {"params": {"media_id": media_id, "k": 20, "collapse": 0.85}}),
        "knn-service": ("POST", "/knn-service", {"content": json.dumps(front)}),
    }
    answers = {}
    for name, (method, path, kwargs) in asked.items():
        response = client.request(method, path, headers=headers, **kwargs)
        assert response.status_code == 200, (name, response.text)
        answers[name] = response.json()
    return answers


def without_build_ids(answers: dict) -> dict:
    """Answers of two builds of the same silver (each names its own build): every form is one."""
    return {name: a | {"build_id": None} if isinstance(a, dict) else a for name, a in answers.items()}


def scores_within_rounding(answers: dict) -> dict:
    """Answers that other answers equal (==) when they differ at most in a score's last printed digit.
    Two search paths can round a score's last float bit apart: FAISS sums a dot product in another
    order when the vectors come in other groups (one set, or a shard's part of it), and the same
    shards answered through Ray Serve's replicas and in one process differed too (both seen on a CPU
    with AVX2 and no AVX-512); the six decimals an answer prints can show that bit. Everything else,
    the order of the results included, must be equal."""

    def walk(value, key: str | None = None):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return pytest.approx(value, rel=0, abs=SCORE_ROUNDING) if key in SCORE_KEYS else value

    return walk(answers)
