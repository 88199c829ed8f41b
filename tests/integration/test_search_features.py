"""Search features over real FAISS builds: near-duplicate collapse, filters, combined queries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers.silver import clustered, media_ids, normalised, write_manifest, write_silver

from rayclip import UserError, ann
from rayclip.options import DEFAULT_COLLAPSE
from rayclip.query.searcher import Searcher
from rayclip.stages import index
from rayclip.store import catalog


@dataclass(frozen=True)
class CopyGroups:
    searcher: Searcher  # over a flat build of the groups' vectors, scattered
    bases: np.ndarray  # the 40 unrelated vectors, one per group
    group_of: dict[str, int]  # media_id -> the group (the base) its vector copies
    copies: list[int]  # near-copies of each base besides itself


@pytest.fixture(scope="module")
def copy_groups(tmp_path_factory) -> CopyGroups:
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
    return CopyGroups(Searcher.open(root), bases, group_of, copies)


def test_collapse_returns_k_distinct_groups_with_folded_counts(copy_groups):
    searcher, bases = copy_groups.searcher, copy_groups.bases
    group_of, copies = copy_groups.group_of, copy_groups.copies
    query = normalised((bases[0] + 0.6 * bases[5] + 0.5 * bases[9])[None])
    plain = searcher.search_vectors(query, k=8)[0]
    assert [group_of[r.media_id] for r in plain] == [0] * 8 and all(r.duplicates == 0 for r in plain)

    folded = searcher.search_vectors(query, k=8, collapse=DEFAULT_COLLAPSE)[0]
    groups = [group_of[r.media_id] for r in folded]
    assert len(folded) == 8 and len(set(groups)) == 8  # searched past the 31 copies of group 0
    # Brute force: groups ranked by their best member's cosine to the query.
    best = {}
    vectors = searcher.vectors(list(range(searcher.build_info.count)))
    for faiss_id, score in enumerate(vectors @ query[0]):
        g = group_of[searcher.mapping.table.column("media_id")[faiss_id].as_py()]
        best[g] = max(best.get(g, -2.0), float(score))
    assert groups == sorted(best, key=best.get, reverse=True)[:8]
    assert folded[0].media_id == plain[0].media_id and folded[0].duplicates == copies[0]
    assert [r.rank for r in folded] == list(range(1, 9))
    assert all(r.duplicates <= copies[g] for r, g in zip(folded, groups))
    assert folded[0].to_dict()["duplicates"] == copies[0]


def test_collapse_threshold_one_folds_nothing_but_exact_copies(copy_groups):
    searcher, bases, group_of = copy_groups.searcher, copy_groups.bases, copy_groups.group_of
    results = searcher.search_vectors(bases[:1], k=5, collapse=1.0)[0]
    assert [group_of[r.media_id] for r in results] == [0] * 5 and all(r.duplicates == 0 for r in results)


def test_bad_collapse_threshold_is_a_user_error(copy_groups):
    from rayclip import UserError

    with pytest.raises(UserError, match="not a cosine"):
        copy_groups.searcher.search_vectors(copy_groups.bases[:1], k=3, collapse=1.5)


# ---------------------------------------------------------------- filters


@dataclass(frozen=True)
class Described:
    root: Path  # the data root of a flat build of the vectors
    searcher: Searcher  # over that build
    vectors: np.ndarray  # row i is media_ids(3000)[i]'s vector
    manifest: object  # pyarrow.Table: the manifest rows written, in the vectors' order


@pytest.fixture(scope="module")
def described(tmp_path_factory) -> Described:
    """3,000 clustered vectors whose manifest rows carry widths, captions, sources and times."""
    root = tmp_path_factory.mktemp("filters") / "data"
    ids = media_ids(3000)
    vectors = clustered(3000, 32, seed=4)
    write_silver(root, "2026-01-01", ids, vectors)
    manifest = write_manifest(root, ids)
    index.build(root)
    return Described(root, Searcher.open(root), vectors, manifest)


def brute_force_filtered(vectors, manifest, query, keep, k):
    """Exact top-k media_ids among the rows `keep` accepts (numpy, no FAISS)."""
    rows = manifest.to_pylist()
    allowed = np.flatnonzero([keep(r) for r in rows])
    order = allowed[np.argsort(-(vectors[allowed] @ query))[:k]]
    return [rows[i]["media_id"] for i in order]


@pytest.mark.parametrize(
    "where, keep",
    [
        ("width >= 512 AND caption LIKE '%dog%'", lambda r: r["width"] >= 512 and "dog" in r["caption"]),
        ("height < 100 OR source = 'folder:b'", lambda r: r["height"] < 100 or r["source"] == "folder:b"),
        (
            "NOT caption ILIKE '%CAT%' AND ingested_at >= '2026-01-20'",
            lambda r: "cat" not in r["caption"] and r["ingested_at"].day >= 20,
        ),
        ("width > 1000 AND height > 1000", lambda r: r["width"] > 1000 and r["height"] > 1000),  # a handful
    ],
)
def test_filter_returns_the_brute_force_top_k_among_matching_rows(described, where, keep):
    searcher, vectors, manifest = described.searcher, described.vectors, described.manifest
    queries = clustered(5, 32, seed=4)
    for query, results in zip(queries, searcher.search_vectors(queries, k=10, where=where)):
        expected = brute_force_filtered(vectors, manifest, query, keep, 10)
        assert [r.media_id for r in results] == expected
        assert len(results) == min(10, sum(keep(r) for r in manifest.to_pylist()))


def test_filter_on_an_ivf_index_still_returns_k(described, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(ann.choice, "FLAT_BELOW", 500)
    monkeypatch.setattr(ann.choice, "HNSW_BELOW", 1000)
    root = tmp_path / "data"
    shutil.copytree(described.root, root)
    report = index.build(root, retrain=True, target_recall=0.9)
    assert report.index_type.startswith("IVF")
    searcher = Searcher.open(root)
    vectors, manifest = described.vectors, described.manifest
    where = "width > 1000 AND caption LIKE '%bird%'"  # under 1% of the rows, spread over every list
    keep = lambda r: r["width"] > 1000 and "bird" in r["caption"]  # noqa: E731
    for query in clustered(5, 32, seed=4):
        results = searcher.search_vectors(query[None], k=10, where=where)[0]
        expected = brute_force_filtered(vectors, manifest, query, keep, 10)
        assert len(results) == 10 and all(keep_row(manifest, r.media_id, keep) for r in results)
        assert len({r.media_id for r in results} & set(expected)) >= 8  # 6-bit codes: near-exact order


def test_filter_on_an_hnsw_index_returns_the_exact_k_past_the_graph_walk(described, tmp_path, monkeypatch):
    """A graph walk at the build's efSearch finds too few rows of a selective filter; the searcher
    raises the effort until k come back, and falls back to exact search over the allowed rows."""
    import shutil

    import faiss

    from rayclip.store import layout

    root = tmp_path / "data"
    shutil.copytree(described.root, root)
    report = index.build(root, index_type="HNSW32", retrain=True)
    assert report.index_type == "HNSW32" and "efSearch" in report.search_params
    searcher = Searcher.open(root)
    vectors, manifest = described.vectors, described.manifest
    where = "width > 1000 AND caption LIKE '%bird%'"  # under 1% of the rows
    keep = lambda r: r["width"] > 1000 and "bird" in r["caption"]  # noqa: E731
    row_of = {r["media_id"]: r for r in manifest.to_pylist()}
    media_ids = searcher.mapping.table.column("media_id").to_pylist()
    allowed = np.array([i for i, m in enumerate(media_ids) if keep(row_of[m])])
    assert 10 < len(allowed) < 30
    # The same query straight to FAISS, at the efSearch the build tuned: fewer than k allowed rows.
    graph = catalog.read_index(layout.index_file(layout.build_dir(root, report.model_version, report.build_id)))
    at_build_effort = faiss.SearchParametersHNSW(
        sel=faiss.IDSelectorBatch(allowed), efSearch=report.search_params["efSearch"]
    )
    queries = clustered(5, 32, seed=4)
    found = (graph.search(queries, 10, params=at_build_effort)[1] >= 0).sum(axis=1)
    assert found.max() < 10, found

    def exact(results, query):
        expected = brute_force_filtered(vectors, manifest, query, keep, 10)
        return [r.media_id for r in results] == expected and all(keep_row(manifest, r.media_id, keep) for r in results)

    assert all(exact(results, q) for q, results in zip(queries, searcher.search_vectors(queries, k=10, where=where)))
    # No raised effort (the first walk says it looked everywhere): the exact fallback alone delivers k.
    once = ann.search_parameters
    monkeypatch.setattr(ann, "search_parameters", lambda *a, **kw: (once(*a, **kw)[0], True))
    assert all(exact(results, q) for q, results in zip(queries, searcher.search_vectors(queries, k=10, where=where)))


def keep_row(manifest, media_id, keep) -> bool:
    return keep(next(r for r in manifest.to_pylist() if r["media_id"] == media_id))


@pytest.mark.parametrize("where", ["width >", "size > 3", "caption LIKE 5", "width >= 5; DROP TABLE x", "(width > 1"])
def test_malformed_filter_is_one_line(described, where, capsys):
    from helpers.stores import cli

    root, searcher, manifest = described.root, described.searcher, described.manifest
    with pytest.raises(UserError, match="bad filter"):
        searcher.search_vectors(clustered(1, 32), k=3, where=where)
    like = manifest.column("media_id")[0].as_py()
    assert cli("search", "--data-dir", str(root), "--like", like, "--where", where) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad filter at character" in err[0]


def test_filter_collapse_and_combined_terms_over_http(described):
    from fastapi.testclient import TestClient

    from rayclip.http.app import create_app

    vectors, manifest = described.vectors, described.manifest
    client = TestClient(create_app(described.root))
    first, second = manifest.column("media_id")[0].as_py(), manifest.column("media_id")[1].as_py()
    where = "width >= 900 AND source = 'folder:b'"  # about 6% of the rows
    body = {"terms": [{"media_id": first, "weight": 2}, {"media_id": second}], "k": 5, "where": where}
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    combined = normalised((2 * vectors[0] + vectors[1])[None])[0]
    keep = lambda r: r["width"] >= 900 and r["source"] == "folder:b"  # noqa: E731
    expected = brute_force_filtered(vectors, manifest, combined, keep, 5)
    assert [r["media_id"] for r in response.json()["results"]] == expected
    assert expected != brute_force_filtered(vectors, manifest, combined, lambda r: True, 5)  # the filter bites
    assert client.post("/api/search", json=body | {"where": "width >"}).status_code == 422
    assert client.post("/api/search", json={"terms": [{"text": "a", "media_id": first}]}).status_code == 422
    assert client.post("/api/search", json={"terms": []}).status_code == 422
    similar = client.get("/api/search/similar", params={"media_id": first, "k": 3}).json()
    assert similar["results"][0]["media_id"] == first and similar["results"][0]["score"] > 0.999
    where, keep = "caption LIKE '%cat%' AND width < 300", lambda r: "cat" in r["caption"] and r["width"] < 300
    assert not keep(manifest.to_pylist()[0])  # the query's own row is filtered out
    similar = client.get("/api/search/similar", params={"media_id": first, "k": 3, "where": where}).json()
    assert [r["media_id"] for r in similar["results"]] == brute_force_filtered(vectors, manifest, vectors[0], keep, 3)
    assert similar["query"]["where"] == where
    assert client.get("/api/search/similar", params={"media_id": "0" * 64}).status_code == 404


# ---------------------------------------------------------------- the real pipeline


@dataclass(frozen=True)
class Pictures:
    root: Path  # the data root the pictures were ingested, embedded and indexed in
    folder: Path  # the pictures' folder (scene_NN.jpg and .txt, twin_q95.jpg, twin_q40.jpg)
    searcher: Searcher  # over the build


@pytest.fixture(scope="module")
def pictures(ray_session, tmp_path_factory) -> Pictures:
    """Synthetic scenes, one of them saved twice (JPEG quality 95 and 40: other bytes, other
    media_id), through ingest (folder) → embed (reference model, real Ray) → index."""
    from rayclip import model, synthetic
    from rayclip.stages import embed, ingest

    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(21)
    scenes = [
        synthetic.Scene(shape, colour, "large", position, "white")
        for shape in synthetic.SHAPES
        for colour in synthetic.COLOURS
        for position in ("left", "right")
    ]
    for i, scene in enumerate(scenes):
        picture = synthetic.render(scene, 256, rng)
        (folder / f"scene_{i:02d}.jpg").write_bytes(synthetic.jpeg_bytes(picture, quality=90))
        (folder / f"scene_{i:02d}.txt").write_text(scene.caption)
    twin = synthetic.render(synthetic.Scene("cross", "yellow", "large", "center", "black"), 256, rng)
    (folder / "twin_q95.jpg").write_bytes(synthetic.jpeg_bytes(twin, quality=95))
    (folder / "twin_q40.jpg").write_bytes(synthetic.jpeg_bytes(twin, quality=40))
    root = tmp_path_factory.mktemp("pipeline") / "data"
    ingest.ingest_folder(root, folder)
    embed.embed(root, model.resolve(None, model.REFERENCE_ALIAS), actors=1, batch_size=8)
    index.build(root)
    return Pictures(root, folder, Searcher.open(root))


def test_the_same_picture_at_two_jpeg_qualities_collapses_into_one(pictures):
    root, folder, searcher = pictures.root, pictures.folder, pictures.searcher
    manifest = catalog.read_manifest(root).to_pylist()
    twins = {r["media_id"] for r in manifest if "twin_q" in r["url"]}
    assert len(twins) == 2  # different bytes: two media_ids, two vectors
    plain = searcher.search_image(folder / "twin_q95.jpg", k=5)
    assert {r.media_id for r in plain[:2]} == twins  # both copies rank first without collapse
    folded = searcher.search_image(folder / "twin_q95.jpg", k=5, collapse=DEFAULT_COLLAPSE)
    assert folded[0].media_id in twins and folded[0].duplicates == 1
    assert len(folded) == 5 and not twins & {r.media_id for r in folded[1:]}
    assert len({r.media_id for r in folded}) == 5


def brute_force_ranked(vectors, rows, query, keep, k, collapse=None):
    """Exact top-k media_ids among the rows `keep` accepts (numpy, no FAISS). With `collapse`, the
    ranking is walked: a row within that cosine of an earlier leader is folded, else it leads."""
    allowed = np.flatnonzero([keep(r) for r in rows])
    leaders = []
    for i in allowed[np.argsort(-(vectors[allowed] @ query))]:
        if collapse is None or not leaders or (vectors[leaders] @ vectors[i]).max() < collapse:
            leaders.append(i)
    return [rows[i]["media_id"] for i in leaders[:k]]


def test_text_and_upload_routes_filter_and_collapse_over_http(pictures):
    from fastapi.testclient import TestClient

    from rayclip.http.app import create_app
    from rayclip.images import decode_image

    folder, searcher = pictures.folder, pictures.searcher
    client = TestClient(create_app(pictures.root))
    rows = searcher.mapping.table.to_pylist()  # row i is faiss_id i
    vectors = searcher.vectors(list(range(len(rows))))  # a flat index: the exact vectors
    twins = {r["media_id"] for r in rows if "twin_q" in r["url"]}

    # GET /api/search: the twins (a yellow cross) and the red scenes only, the twins folded into one.
    text = "a large yellow cross in the center on a black background"
    where = "url LIKE '%twin_q%' OR caption LIKE '%red%'"
    keep = lambda r: "twin_q" in r["url"] or "red" in (r["caption"] or "")  # noqa: E731
    params = {"q": text, "k": 4, "where": where, "collapse": DEFAULT_COLLAPSE}
    response = client.get("/api/search", params=params)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    query = searcher.model.encode_texts([text])[0]
    assert not set(brute_force_ranked(vectors, rows, query, keep, 4)) & set(
        brute_force_ranked(vectors, rows, query, lambda r: "twin_q" not in r["url"], 4)
    )  # the filter bites: without it, other scenes fill the top 4
    assert [r["media_id"] for r in results] == brute_force_ranked(vectors, rows, query, keep, 4, DEFAULT_COLLAPSE)
    assert len(twins & {r["media_id"] for r in results}) == 1
    assert [r["duplicates"] for r in results if r["media_id"] in twins] == [1]
    assert all(keep(next(row for row in rows if row["media_id"] == r["media_id"])) for r in results)
    assert response.json()["query"] == params
    unfolded = client.get("/api/search", params={p: v for p, v in params.items() if p != "collapse"}).json()
    assert [r["media_id"] for r in unfolded["results"]] == brute_force_ranked(vectors, rows, query, keep, 4)
    assert twins <= {r["media_id"] for r in unfolded["results"]}  # without collapse both twins come back

    # POST /api/search/image: a twin as the query, the filter keeping red scenes only.
    data = (folder / "twin_q95.jpg").read_bytes()
    where, keep = "caption LIKE '%red%'", lambda r: "red" in (r["caption"] or "")
    upload = client.post("/api/search/image", params={"k": 5, "where": where}, files={"file": ("q.jpg", data)})
    assert upload.status_code == 200, upload.text
    query = searcher.model.encode_images([decode_image(data)])[0]
    assert [r["media_id"] for r in upload.json()["results"]] == brute_force_ranked(vectors, rows, query, keep, 5)
    assert not twins & {r["media_id"] for r in upload.json()["results"]} and upload.json()["query"]["where"] == where


def test_combined_query_moves_the_ranking_as_the_arithmetic_says(pictures, tmp_path, capsys):
    """A blue square on the left, minus "blue", plus "red": the red square on the left comes into
    the top 5, where the picture alone does not bring it (checked on the reference model)."""
    from helpers.stores import cli

    from rayclip import synthetic
    from rayclip.query.terms import Term

    root, searcher = pictures.root, pictures.searcher
    query = tmp_path / "blue_square_left.jpg"
    scene = synthetic.Scene("square", "blue", "large", "left", "white")
    query.write_bytes(synthetic.jpeg_bytes(synthetic.render(scene, 256, np.random.default_rng(99))))
    target_caption = synthetic.Scene("square", "red", "large", "left", "white").caption
    target = next(r["media_id"] for r in catalog.read_manifest(root).to_pylist() if r["caption"] == target_caption)

    alone = searcher.search([Term("image", query)], k=5)
    combined = searcher.search([Term("image", query), Term("text", "blue", -1.0), Term("text", "red")], k=5)
    assert target not in {r.media_id for r in alone}
    assert target in {r.media_id for r in combined}
    # The CLI says the same, weights written rclip-style.
    assert (
        cli(
            "search",
            "--data-dir",
            str(root),
            "--image",
            str(query),
            "--subtract",
            "1:blue",
            "--add",
            "red",
            "--k",
            "5",
            "--json",
        )
        == 0
    )
    assert target in {r["media_id"] for r in json.loads(capsys.readouterr().out)}
    # The sum is normalised: its top score is a cosine, and weights scale nothing else.
    doubled = searcher.search([Term("image", query, 2.0), Term("text", "blue", -2.0), Term("text", "red", 2.0)], k=5)
    assert [r.media_id for r in doubled] == [r.media_id for r in combined]
    assert [r.score for r in doubled] == pytest.approx([r.score for r in combined], abs=1e-5)
    assert all(-1.0 <= r.score <= 1.0 for r in combined)
    with pytest.raises(UserError, match="cancel out"):
        searcher.search([Term("text", "red"), Term("text", "red", -1.0)])
    assert Term.parse("text", "2:red car", -1.0) == Term("text", "red car", -2.0)
    assert Term.parse("text", "at 10:30") == Term("text", "at 10:30", 1.0)


def test_collapse_from_the_cli(copy_groups, capsys):
    from helpers.stores import cli

    searcher, group_of, copies = copy_groups.searcher, copy_groups.group_of, copy_groups.copies
    first = next(m for m, g in group_of.items() if g == 0)
    root = str(searcher.root)
    assert cli("search", "--data-dir", root, "--like", first, "--collapse", "--k", "4", "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [group_of[r["media_id"]] for r in results][0] == 0 and results[0]["duplicates"] == copies[0]
    assert len({group_of[r["media_id"]] for r in results}) == 4
    assert cli("search", "--data-dir", root, "--like", first, "--k", "4") == 0
    assert "+near-dups" not in capsys.readouterr().out
    assert cli("search", "--data-dir", root, "--like", first, "--k", "4", "--collapse", "0.9") == 0
    assert "+near-dups" in capsys.readouterr().out
