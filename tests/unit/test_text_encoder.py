"""The text tower runs on the batch's real tokens only: same features as open_clip on the full context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayclip import model

TEXTS = [
    "",  # start and end markers only
    "a dog",
    "two people walking on a beach at sunset, with a red boat behind them",
    "a very long caption " + "that goes on and on " * 30,  # truncated to the context length
]


def full_context(clip: model.ClipModel, texts: list[str]) -> np.ndarray:
    """open_clip's encode_text on all context_length tokens, L2-normalised."""
    with torch.inference_mode():
        features = clip.model.encode_text(clip.tokenizer(texts)).float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


@pytest.fixture(scope="module", params=[("ViT-B-32", "none"), ("RayCLIP-Ref", "reference")], ids=lambda p: p[0])
def clip(request):
    return model.load_model(model.resolve(*request.param), precision="fp32")


def test_both_models_take_the_trimmed_path(clip, monkeypatch):
    assert model.trims_padding(clip.model)
    assert clip.tokenizer(["a dog"]).argmax(dim=-1).item() + 1 < clip.context_length  # so there is padding to cut

    def untrimmed(tokens):
        raise AssertionError("the full-context text tower ran")

    monkeypatch.setattr(clip.model, "encode_text", untrimmed)
    assert clip._encode_tokens(clip.tokenizer(["a dog"])).shape == (1, clip.dim)


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one-by-one"])
def test_trimmed_features_equal_the_full_context(clip, batched):
    clip._text_cache.clear()
    got = clip.encode_texts(TEXTS) if batched else np.concatenate([clip.encode_texts([t]) for t in TEXTS])
    want = full_context(clip, TEXTS)
    assert clip.tokenizer(TEXTS[-1:])[0, -1] != 0  # the long caption really fills the context
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got * want).sum(axis=1).min() > 0.99999


@pytest.mark.parametrize("change", ["bidirectional", "last-token pooling"])
def test_other_towers_run_on_the_full_context(change, monkeypatch):
    """Where cutting the padding would change the features, the model's own encode_text runs."""
    clip = model.load_model(model.resolve("RayCLIP-Ref", "reference"), precision="fp32")
    if change == "bidirectional":
        monkeypatch.setattr(clip.model, "attn_mask", None)  # every token attends to the padding too
    else:
        monkeypatch.setattr(clip.model, "text_pool_type", "last")  # pooled at the last (padding) position
    assert not model.trims_padding(clip.model)
    np.testing.assert_allclose(clip.encode_texts(TEXTS[:2]), full_context(clip, TEXTS[:2]), atol=1e-5)
