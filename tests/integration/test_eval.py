"""Retrieval quality through the whole pipeline: the reference model clears the bar, random init does not."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from helpers.site import HeldOut, held_out_site
from helpers.stores import cli

from rayclip import Searcher, UserError
from rayclip.store import storage

HELD_OUT_SEED = 4321  # training renders with seed 0; the demo uses 1234


@pytest.fixture(scope="module")
def recall_held_out(tmp_path_factory) -> Iterator[HeldOut]:
    """500 held-out images: enough queries for recall@5 to tell the reference model from chance."""
    with held_out_site(tmp_path_factory.mktemp("heldout"), 500, HELD_OUT_SEED) as site:
        yield site


def run_eval(metadata, root, *model_args: str) -> dict:
    assert cli("eval", "--metadata", str(metadata), "--data-dir", str(root), *model_args) == 0
    gold = [p for p in (root / "gold").glob("*/builds/*/eval.json")]
    newest = max(gold, key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


@pytest.mark.slow
def test_reference_model_clears_the_recall_bar_and_random_init_stays_near_chance(recall_held_out, ray_session):
    metadata, root = recall_held_out.metadata, recall_held_out.root
    reference = run_eval(metadata, root, "--pretrained", "reference")
    assert reference["model_version"] == "clip_rayclip_ref_reference"
    assert reference["images"] == 500 and reference["queries"] > 300
    assert reference["text_to_image"]["5"] >= 0.90
    assert reference["text_to_image"]["1"] <= reference["text_to_image"]["5"] <= reference["text_to_image"]["10"]
    assert reference["image_to_text"]["5"] >= 0.80

    random = run_eval(metadata, root, "--model", "RayCLIP-Ref", "--pretrained", "none")
    assert random["model_version"] == "clip_rayclip_ref_none"
    chance = random["chance_text_to_image"]["5"]
    assert chance < 0.03
    assert random["text_to_image"]["5"] < 0.10  # near chance: a random model cannot find the captioned image
    assert (storage.data_root(root) / "gold" / "clip_rayclip_ref_none").is_dir()
    # Two model_versions in one store: search must be told which.
    with pytest.raises(UserError, match="several model_versions present"):
        Searcher.open(root)
    assert Searcher.open(root, "clip_rayclip_ref_reference").build_info.count == 500
