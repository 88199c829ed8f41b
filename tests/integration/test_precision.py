"""Reduced precision: what `auto` picks, and the text cache. (bf16 against fp32 through the pipeline, its
vectors, recall and records: test_eval.py, on the held-out store of its recall run.)"""

from __future__ import annotations

import numpy as np
import pytest

from rayclip import UserError, model


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    for flags, expected in [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), ({"avx2"}, "fp32")]:
        monkeypatch.setattr(model.precision, "cpu_flags", lambda flags=flags: flags)
        assert model.choose_precision("auto") == expected
    assert model.choose_precision("fp16") == "fp16"  # asked for explicitly: kept, native or not
    with pytest.raises(UserError, match="unknown precision 'int8'"):
        model.choose_precision("int8")


def test_auto_precision_on_a_gpu_is_bf16_where_it_runs_natively_else_fp16(monkeypatch):
    import torch

    for native, expected in [(True, "bf16"), (False, "fp16")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert model.choose_precision("auto", "cuda") == expected


def test_repeated_text_queries_come_from_the_cache(monkeypatch):
    clip = model.load_model(model.resolve(None, model.REFERENCE_ALIAS), threads=1, precision="fp32")
    first = clip.encode_texts(["a red circle", "a blue star"])
    calls = []
    encode_tokens = clip._encode_tokens  # the text tower, trimmed or not
    monkeypatch.setattr(clip, "_encode_tokens", lambda tokens: calls.append(len(tokens)) or encode_tokens(tokens))
    again = clip.encode_texts(["a blue star", "a green cross", "a red circle", "a green cross"])
    assert calls == [1]  # only the one new text reached the text tower, once
    assert np.array_equal(again[[0, 2]], first[[1, 0]]) and np.array_equal(again[1], again[3])
    assert np.allclose(np.linalg.norm(again, axis=1), 1, atol=1e-5)
