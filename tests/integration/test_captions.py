"""Captions as data: each distinct caption's vector and every (image, caption) pair's clip_score in
silver, `--where clip_score` on every search route, and the build's caption index behind
`rayclip search --over captions` and clip-retrieval's `modality: "text"` (through its real client)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from fastapi.testclient import TestClient
from helpers.clip_retrieval import clip_client_module
from helpers.silver import clustered, media_ids, reference_spec, write_manifest, write_silver
from helpers.stores import cli, read_silver

from rayclip import model, pipeline
from rayclip.cli import build_parser
from rayclip.errors import UserError
from rayclip.http.app import create_app
from rayclip.options import SearchOptions
from rayclip.query.searcher import Searcher
from rayclip.query.terms import Term
from rayclip.stages import captions, index
from rayclip.store import catalog, debris, layout, storage
from rayclip.store import silver as silver_store

QUERY = "a large red circle on the left on a white background"

MODEL_VERSION = "clip_rayclip_ref_reference"


def silver(root, table: str, columns: list[str]):
    return catalog.read_silver(storage.data_root(root), MODEL_VERSION, table, columns)


def mapping_of(gold_store):
    return catalog.read_parquet(layout.mapping_file(storage.data_root(gold_store.build.path)))


def test_a_stored_caption_vector_is_open_clips_text_embedding(gold_store):
    """One row per distinct caption of the embedded images, keyed by the sha256 of its text, holding
    what open_clip's own encode_text gives for it (full context, fp32)."""
    root = gold_store.root
    stored = silver(root, layout.CAPTIONS, ["caption_id", "caption", "embedding"])
    embedded = set(read_silver(root, MODEL_VERSION).column("media_id").to_pylist())
    manifest = catalog.read_manifest(storage.data_root(root), ["media_id", "caption"]).to_pylist()
    assert sorted(stored["caption"].to_pylist()) == sorted(
        {r["caption"] for r in manifest if r["media_id"] in embedded}
    )
    assert stored["caption_id"].to_pylist() == [layout.caption_id(c) for c in stored["caption"].to_pylist()]
    clip = model.load_model(reference_spec(), precision="fp32")
    with torch.inference_mode():
        features = clip.model.encode_text(clip.tokenizer(stored["caption"].to_pylist())).float()
    expected = (features / features.norm(dim=-1, keepdim=True)).numpy()
    vectors = np.stack(stored["embedding"].to_numpy(zero_copy_only=False))
    assert (vectors * expected).sum(axis=1).min() >= 0.999


def test_the_image_runs_actors_encode_the_new_captions_and_the_caption_stage_only_scores(gold_store):
    """The images' captions are encoded by the actors that embed the images, in the image run, and
    committed by it; the caption stage after it finds none to encode and scores the pairs."""
    root = storage.data_root(gold_store.root)
    (image_run,) = [json.loads(p.read_text()) for p in layout.embed_runs_dir(root).glob("*.json")]
    (caption_run,) = [json.loads(p.read_text()) for p in layout.caption_runs_dir(root).glob("*.json")]
    stored = silver(root, layout.CAPTIONS, ["caption_id", "caption"])
    commits = catalog.silver_commits(root, MODEL_VERSION, layout.CAPTIONS)
    assert [commit["run_id"] for commit in commits] == [image_run["run_id"]]
    assert image_run["captions_embedded"] == stored.num_rows == len(set(stored["caption"].to_pylist())) > 1
    assert image_run["caption_encode_s"] > 0
    assert (caption_run["captions_planned"], caption_run["captions_embedded"]) == (0, 0)
    assert caption_run["pairs_scored"] == silver(root, layout.CLIP_SCORES, ["media_id"]).num_rows >= stored.num_rows


def test_clip_score_is_the_dot_product_of_the_stored_vectors(gold_store):
    """Every (media_id, caption) pair's clip_score is image vector · caption vector as read back from
    silver, and the mapping carries each media_id's best one (the first image has three captions)."""
    root = gold_store.root
    images = read_silver(root, MODEL_VERSION)
    image_of = dict(zip(images["media_id"].to_pylist(), images["embedding"].to_numpy(zero_copy_only=False)))
    captions = silver(root, layout.CAPTIONS, ["caption_id", "embedding"])
    caption_of = dict(zip(captions["caption_id"].to_pylist(), captions["embedding"].to_numpy(zero_copy_only=False)))
    scores = silver(root, layout.CLIP_SCORES, ["media_id", "caption_id", "clip_score"]).to_pylist()
    assert len(scores) == len({(s["media_id"], s["caption_id"]) for s in scores}) > len(image_of)
    for s in scores:
        assert s["clip_score"] == pytest.approx(
            float(np.dot(image_of[s["media_id"]], caption_of[s["caption_id"]])), abs=1e-6
        )
    best = {}
    for s in scores:
        best[s["media_id"]] = max(best.get(s["media_id"], -1.0), s["clip_score"])
    mapping = mapping_of(gold_store)
    assert dict(zip(mapping["media_id"].to_pylist(), mapping["clip_score"].to_pylist())) == best
    assert max(pc.count(pc.filter(mapping["media_id"], pc.equal(mapping["media_id"], m))).as_py() for m in best) == 1


def test_where_clip_score_filters_on_every_route(gold_store, gold_searcher, capsys):
    """The same filter keeps the same images through Python, /api/search and the CLI (image index
    and caption index alike); the CLI call also shows `--over captions` end to end."""
    mapping = mapping_of(gold_store).to_pylist()
    cut = float(np.median([r["clip_score"] for r in mapping]))
    where = f"clip_score >= {cut}"
    kept = {r["media_id"] for r in mapping if r["clip_score"] >= cut}
    assert 0 < len(kept) < len(mapping)
    python = gold_searcher.search_text(QUERY, k=len(mapping), where=where)
    assert {r.media_id for r in python} == kept
    api = TestClient(create_app(gold_store.root)).get("/api/search", params={"q": QUERY, "k": 100, "where": where})
    assert api.status_code == 200, api.text
    assert {r["media_id"] for r in api.json()["results"]} == kept
    over = gold_searcher.find([[Term("text", QUERY)]], SearchOptions(k=len(mapping), where=where, over="captions"))[0]
    assert {r.media_id for r in over} == kept
    # The caption index over HTTP, GET and POST: the same (image, caption) results as Python.
    client = TestClient(create_app(gold_store.root))
    get = client.get("/api/search", params={"q": QUERY, "k": 100, "where": where, "over": "captions"})
    body = {"terms": [{"text": QUERY}], "k": 100, "where": where, "over": "captions"}
    post = client.post("/api/search", json=body)
    for answer in (get, post):
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [(r["media_id"], r["caption_row"]) for r in results] == [(r.media_id, r.caption_row) for r in over]
    code = cli("search", "--data-dir", str(gold_store.root), "--q", QUERY, "--where", where, "--over", "captions",
               "--k", "100", "--json")  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["media_id"] for r in shown] == [r.media_id for r in over]
    assert [r["caption_row"] for r in shown] == [r.caption_row for r in over]


def test_the_caption_index_answers_modality_text_through_clip_client(live_gold, gold_store, gold_searcher):
    """clip-retrieval 2.45's own ClipClient with Modality.TEXT: the caption found first is the query's
    own text (cosine 1), and the results are the images that carry it, then the next captions'."""
    module = clip_client_module()
    clip = module.ClipClient(
        url=f"{live_gold.url}/knn-service", indice_name=MODEL_VERSION, modality=module.Modality.TEXT, num_images=10,
        deduplicate=False,
    )  # fmt: skip
    caption = gold_searcher.mapping.table["caption"][0].as_py()  # the first image's (it carries three captions)
    got = clip.query(text=caption)
    manifest = catalog.read_manifest(storage.data_root(gold_store.root), ["url", "caption"]).to_pylist()
    carriers = {r["url"] for r in manifest if r["caption"] == caption}
    top = [r for r in got if r["caption"] == caption]
    assert got[: len(top)] == top and top[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert {r["url"] for r in top} == carriers  # every image carrying it, and no other
    ids = [r["id"] for r in got]  # image faiss_ids: /metadata answers for them
    assert [gold_searcher.mapping.table["url"][i].as_py() for i in ids] == [r["url"] for r in got]
    expected = gold_searcher.find([[Term("text", caption)]], SearchOptions(k=10, over="captions"))[0]
    assert [(r["id"], r["similarity"]) for r in got] == [(r.faiss_id, r.score) for r in expected]
    rows = catalog.read_parquet(layout.caption_mapping_file(storage.data_root(gold_store.build.path)))
    assert len(set(rows["caption_id"].to_pylist())) == rows.num_rows == gold_searcher.build_info.captions["count"]


def test_no_captions_then_captions_then_a_rerun_that_repeats_nothing(tmp_path, ray_session, monkeypatch):
    """--no-captions leaves the caption tables empty (clip_score null, no caption index); the next
    embed encodes each distinct caption once (on Ray Data's actor pool here, as a large run does) and
    scores each pair; a rerun repeats neither, and a new image carrying a known caption only adds its score."""
    assert build_parser().parse_args(["embed", "--no-captions"]).no_captions
    root, spec = tmp_path / "data", reference_spec()
    ids = media_ids(7)
    write_manifest(root, ids[:6])  # captions "a dog number 0" …: six distinct
    write_silver(root, "2026-01-01", ids[:6], clustered(6))
    embedded, captioned = pipeline.embed_silver(root, spec, no_captions=True)
    assert embedded.rows_planned == 0 and captioned is None
    assert silver(root, layout.CAPTIONS, ["caption_id"]) is None
    index.build(root)
    assert Searcher.open(root).mapping.table["clip_score"].null_count == 6
    with pytest.raises(UserError, match="has no caption index"):
        Searcher.open(root).find([[Term("text", QUERY)]], SearchOptions(over="captions"))

    monkeypatch.setattr(captions, "DRIVER_ENCODE_CAPTIONS", 0)  # what a run of more captions does
    _, first = pipeline.embed_silver(root, spec, batch_size=4)
    assert (first.captions_embedded, first.pairs_scored, first.actors) == (6, 6, 1)
    monkeypatch.undo()
    _, again = pipeline.embed_silver(root, spec)
    assert (again.captions_planned, again.captions_embedded, again.pairs_scored) == (0, 0, 0)
    assert len(catalog.silver_commits(storage.data_root(root), MODEL_VERSION, layout.CLIP_SCORES)) == 1

    manifest = catalog.read_manifest(storage.data_root(root)).to_pylist()[:1]
    write_manifest(root, [ids[6]], seed=1)  # caption "a dog number 0": known
    write_silver(root, "2026-01-02", [ids[6]], clustered(1, seed=1))
    _, new = pipeline.embed_silver(root, spec)
    assert (new.captions_embedded, new.pairs_scored) == (0, 1) and manifest[0]["caption"] == "a dog number 0"
    assert silver(root, layout.CAPTIONS, ["caption_id"]).num_rows == 6
    index.build(root)
    assert Searcher.open(root).mapping.table["clip_score"].null_count == 0


def test_a_dead_caption_runs_files_are_never_read_and_are_debris(tmp_path):
    """Files a caption run wrote before it died (no commit record, no live work folder): no reader
    sees them, and `rayclip gc` finds them, in either caption table."""
    root = storage.data_root(tmp_path / "data")
    run_id = layout.new_run_id()
    vectors = clustered(2)
    rows = silver_store.captions_table(pa.array([layout.caption_id(t) for t in "ab"]), pa.array(list("ab")), vectors)
    silver_store.write_files(root, MODEL_VERSION, layout.CAPTIONS, "2026-01-01", run_id, [rows])
    scores = pa.table({"media_id": media_ids(1), "caption_id": rows["caption_id"][:1], "clip_score": [0.5]})
    silver_store.write_files(root, MODEL_VERSION, layout.CLIP_SCORES, "2026-01-01", run_id, [scores])
    assert catalog.silver_latest(root, MODEL_VERSION, layout.CAPTIONS, ["caption_id"], [], "embedded_at") is None
    assert catalog.read_silver(root, MODEL_VERSION, layout.CLIP_SCORES, ["clip_score"]) is None
    found = sorted(str(p.relative_to(root)) for p in debris.find(root))
    name = layout.silver_file_name
    assert found == [
        f"silver/captions/model_version={MODEL_VERSION}/dt=2026-01-01/{name(run_id, layout.CAPTIONS, 0)}",
        f"silver/clip_scores/model_version={MODEL_VERSION}/dt=2026-01-01/{name(run_id, layout.CLIP_SCORES, 0)}",
    ]
