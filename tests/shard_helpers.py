"""A gold build kept in shards, made from a normal IVF build by plain FAISS (until `rayclip index`
writes them itself): shard k holds faiss_ids first..first+count-1 with their global ids, all on the
build's one trained quantizer; build.json's form, shards and file_bytes say so."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import faiss
import numpy as np

from rayclip.store import catalog, layout


def split_into_shards(root: Path, model_version: str, build_id: str, shards: int = 2) -> None:
    """Rewrite an IVF build (no Refine) into `shards` files: each list's codes and ids copied as they
    are into the shard whose range holds them, so every shard searches exactly as the whole did."""
    folder = layout.build_dir(root, model_version, build_id)
    info = catalog.build_info(root, model_version, build_id)
    whole = faiss.read_index(str(layout.index_file(folder)))
    lists = faiss.extract_index_ivf(whole).invlists
    bounds = np.linspace(0, whole.ntotal, shards + 1).astype(int)
    info.shards, info.form = [], "shards"
    for k, (first, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard = faiss.clone_index(whole)
        shard.reset()  # the trained quantizer stays, the lists empty
        ivf = faiss.extract_index_ivf(shard)
        for number in range(lists.nlist):
            size = lists.list_size(number)
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).reshape(size, -1)
            own = (ids >= first) & (ids < end)
            if own.any():
                kept, kept_codes = np.ascontiguousarray(ids[own]), np.ascontiguousarray(codes[own])
                ivf.invlists.add_entries(number, int(own.sum()), faiss.swig_ptr(kept), faiss.swig_ptr(kept_codes))
        ivf.ntotal = shard.ntotal = int(end - first)
        faiss.write_index(shard, str(layout.shard_file(folder, k)))
        info.shards.append({"file": layout.shard_file(folder, k).name, "first": int(first), "count": int(end - first)})
    layout.index_file(folder).unlink()
    _record_sizes(folder, info)


def to_ondisk(root: Path, model_version: str, build_id: str) -> None:
    """Rewrite an IVF build as FAISS's merge_ondisk leaves it: index.faiss (the trained quantizer and
    the lists' offsets) beside index.ivfdata (the codes and ids), form "ondisk"."""
    from faiss.contrib.ondisk import merge_ondisk

    folder = layout.build_dir(root, model_version, build_id)
    info = catalog.build_info(root, model_version, build_id)
    whole = layout.index_file(folder)
    trained = faiss.clone_index(faiss.read_index(str(whole)))
    trained.reset()
    merge_ondisk(trained, [str(whole)], str(layout.index_data_file(folder)))
    faiss.write_index(trained, str(whole))
    info.form = "ondisk"
    _record_sizes(folder, info)


def _record_sizes(folder: Path, info) -> None:
    record = layout.build_info_file(folder).name
    info.file_bytes = {f.name: f.stat().st_size for f in folder.iterdir() if f.name != record}
    info.write(layout.build_info_file(folder))


def copy_with(root: Path, copy: Path, model_version: str, build_id: str, rewrite) -> Path:
    """A copy of a data root whose build `build_id` is rewritten (split_into_shards, to_ondisk)."""
    shutil.copytree(root, copy)
    rewrite(copy, model_version, build_id)
    return copy


def sharded_copy(root: Path, copy: Path, model_version: str, build_id: str, shards: int = 2) -> Path:
    """A copy of a data root whose build `build_id` is kept in shards."""
    return copy_with(root, copy, model_version, build_id, functools.partial(split_into_shards, shards=shards))


def a_build(root: Path, n: int = 4000, index_type: str = "IVF64,Flat"):
    """A small IVF build of clustered vectors with a manifest (so --where has columns to filter)."""
    from silver_helpers import clustered, media_ids, write_manifest, write_silver

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
