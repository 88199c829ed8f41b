"""--runtime openvino: the image tower on OpenVINO gives open_clip's vectors, is cached per model_version,
is recorded, and its missing extra is one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers.stores import cli, embed_runs, open_clip_embeddings, vectors_by_id

from rayclip import model
from rayclip.images import decode_image
from rayclip.model import openvino
from rayclip.stages.embed import run as embed_run
from rayclip.store import catalog

pytest.importorskip("openvino")  # the optional extra (the dev extra installs it)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """This test's own cache of converted towers (storage.cache_home follows $XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_image_vectors_are_open_clips_fp32(ingested, own_cache, precision):
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    tower, cached = openvino.image_tower(spec)
    assert not cached and openvino.image_tower(spec)[1]  # converted once, then read back from the cache
    parts = model.load_model(spec, precision=precision).parts(tower)
    assert not any(name.startswith("visual.") for name in parts.tensors)  # torch's image tower stays behind
    on_openvino = model.ClipModel.from_parts(parts, threads=2)
    rows = catalog.read_manifest(ingested, ["media_id", "path"]).to_pylist()[:9]  # an odd batch: dynamic size
    pixels = [on_openvino.pixels(decode_image((ingested / row["path"]).read_bytes())) for row in rows]
    vectors = on_openvino.encode_uint8(on_openvino.stack(pixels))
    expected = open_clip_embeddings(ingested, [row["media_id"] for row in rows])
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(vectors * expected, axis=1)) >= 0.999


@pytest.mark.timeout(900)  # two embed runs of the reference model
def test_cli_embed_runtime_openvino_matches_open_clip_and_reuses_its_conversion(store, ray_session, own_cache):
    def embed_as(save_as: str, *args: str) -> dict:
        argv = ["--pretrained", "reference", "--precision", "fp32", "--no-captions", "--save-as", save_as, *args]
        assert cli("embed", "--data-dir", str(store), "--runtime", "openvino", *argv) == 0
        return [run for run in embed_runs(store) if run["model_version"] == save_as][-1]

    first = embed_as("ref_ov")
    again = embed_as("ref_ov", "--force")
    assert first["runtime"] == again["runtime"] == "openvino"
    assert not first["converted_from_cache"] and again["converted_from_cache"]
    assert first["rows_embedded"] == again["rows_embedded"] > 0
    by_openvino = vectors_by_id(store, "ref_ov")
    ids = sorted(by_openvino)
    by_torch = dict(zip(ids, open_clip_embeddings(store, ids)))  # open_clip's own fp32 forward
    assert len(ids) == first["rows_embedded"]
    assert min(float(by_openvino[m] @ by_torch[m]) for m in ids) >= 0.999
    # and OpenVINO computed them: another runtime's kernels never give torch's very bits
    assert not all(np.array_equal(by_openvino[m], by_torch[m]) for m in ids)


@pytest.mark.parametrize(
    ("installed", "args", "message"),
    [(False, [], openvino.MISSING), (True, ["--gpus-per-actor", "1"], "--runtime openvino runs on CPUs")],
)
def test_a_runtime_that_cannot_run_is_one_line_before_any_work(store, monkeypatch, capsys, installed, args, message):
    if not installed:
        monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails as if not installed
    monkeypatch.setattr(embed_run, "plan_sources", lambda *_: pytest.fail("planned before checking the runtime"))
    argv = ["--pretrained", "reference", "--runtime", "openvino", *args]
    assert cli("embed", "--data-dir", str(store), *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
