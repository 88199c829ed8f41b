"""Start-up and decode layouts: the model shared as parts, uint8 pixels, decode tasks, GPU-decode fallback."""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import shutil
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import bounded
from helpers.stores import assert_rows_are_open_clips, cli, read_silver
from PIL import Image

from rayclip import images, model
from rayclip.cluster import LOOPBACK
from rayclip.stages import embed
from rayclip.store import catalog, layout


def store_objects(root, count: int) -> list[bytes]:
    paths = catalog.read_manifest(root, ["path"]).column("path").to_pylist()[:count]
    return [(root / path).read_bytes() for path in paths]


def test_a_process_keeps_its_query_models_and_sets_torchs_threads_each_time(monkeypatch):
    """load_model(kept=True) with the same model and precision again is the model already loaded,
    with torch's threads set again as asked; another precision is another model; a model loaded
    without `kept` (a run's own, as embed's driver loads it) is neither kept nor one of the kept."""
    monkeypatch.setattr(model.clip, "ClipModel", counted := mock.Mock(wraps=model.ClipModel))
    model.clip._kept.cache_clear()
    spec = model.resolve(None, "reference")
    threads = torch.get_num_threads()
    try:
        first = model.load_model(spec, threads=1, precision="fp32", kept=True)
        torch.set_num_threads(2)
        assert model.load_model(spec, threads=1, precision="fp32", kept=True) is first
        assert torch.get_num_threads() == 1
        assert model.load_model(spec, precision="fp32") is not first
        assert model.load_model(spec, precision="bf16", kept=True) is not first and counted.call_count == 3
        assert model.load_model(spec, precision="fp32", kept=True) is first and counted.call_count == 3
    finally:
        torch.set_num_threads(threads)
        model.clip._kept.cache_clear()  # the models of the counting class go


def test_shared_parts_rebuild_the_model_and_uint8_pixels_normalise_like_preprocess(ingested):
    clip = model.load_model(model.resolve(None, "reference"), threads=1, precision="fp32")
    pictures = [images.decode_image(data) for data in store_objects(ingested, 4)]
    pixels = clip.pixels.stack([clip.pixels(p) for p in pictures])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, *clip.pixels.size)
    # The batch normalised at once is preprocess() image by image, bit for bit.
    assert torch.equal(clip.normalise(pixels), clip.preprocess_images(pictures))

    rebuilt = model.ClipModel.from_parts(pickle.loads(pickle.dumps(clip.parts())), threads=1)
    assert np.array_equal(rebuilt.encode_uint8(pixels.numpy()), clip.encode_uint8(pixels))
    half = model.load_model(model.resolve(None, "reference"), threads=1, precision="bf16")
    from_half = model.ClipModel.from_parts(pickle.loads(pickle.dumps(half.parts())), threads=1)
    assert from_half.model.visual.conv1.weight.dtype == torch.bfloat16
    assert np.array_equal(from_half.encode_uint8(pixels), half.encode_uint8(pixels))


def test_a_model_rebuilt_from_parts_runs_the_text_tower_as_open_clips_own():
    """The same operations as the loaded model: built with requires_grad off, each attention's input
    projection ran as a batched matmul over a copy of the weight per position (3x slower in actors)."""
    clip = model.load_model(model.resolve(None, "reference"), threads=1, precision="fp32")
    rebuilt = model.ClipModel.from_parts(pickle.loads(pickle.dumps(clip.parts())), threads=1)
    calls = []
    for encoder in (clip, rebuilt):
        with torch.profiler.profile() as seen:
            encoder.encode_texts(["a red circle on a blue square", "two dogs"])
        calls.append({event.key: event.count for event in seen.key_averages() if event.key.startswith("aten::")})
    assert calls[1] == calls[0]


@pytest.fixture(scope="module")
def embed_actor(ingested, ray_session):
    """One embed actor, as a run starts it (the reference model's parts, CPU, decode in the actor)."""
    parts = ray_session.put(model.load_model(model.resolve(None, "reference"), threads=1).parts())
    udf = ray_session.remote(num_cpus=0.1)(embed.EmbedUDF)
    actor = udf.remote([parts], model.REFERENCE_MODEL, str(ingested), 1, 1, "actor", "cpu", None)
    yield actor
    ray_session.kill(actor)


def test_an_actor_imports_open_clip_without_timm_unless_its_model_has_a_timm_tower(embed_actor, ray_session):
    """An embed actor builds its one model: one without a timm image tower (the reference model,
    ViT-B-32) comes with open_clip but not timm, nor the wandb timm imports (0.8 s of CPU per actor);
    the model is whole. Models with a timm tower, or whose config is not here, keep timm."""
    assert [model.names.has_timm_tower(name) for name in ("convnext_base", "hf-hub:org/model")] == [True, True]
    assert not model.names.has_timm_tower("ViT-B-32")
    loaded = embed_actor.__ray_call__.remote(
        lambda udf: ([m for m in ("open_clip", "timm", "wandb") if m in sys.modules], udf.model.dim)
    )
    assert ray_session.get(loaded, timeout=120) == (["open_clip"], 128)


def _glibc_reports_its_heaps() -> bool:
    """Whether this C library is glibc 2.33 or later, with mallinfo2 to ask its heaps what they hold."""
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:  # no glibc (macOS, musl)
        return False


@pytest.mark.skipif(not _glibc_reports_its_heaps(), reason="measures glibc's heaps with mallinfo2: needs glibc >= 2.33")
def test_an_actor_holds_the_memory_its_batches_free(embed_actor, ray_session):
    """glibc held to freed memory in the actor (model.hold_freed_memory), seen from a thread that
    started after it (as Ray Data's call threads do): an allocation over glibc's largest automatic
    mmap threshold (32 MiB) comes from the thread's heap, not a mapping of its own, and once freed it
    stays with the process for the next batch. A fresh process maps it and gives it back."""

    def allocations(mib: int = 48) -> tuple[int, int]:
        """(chunks glibc mapped for one allocation of `mib` MiB, the MiB its heaps hold free once it was freed)."""
        import ctypes
        import threading

        import numpy as np

        class Mallinfo2(ctypes.Structure):
            fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"  # glibc's, all
            _fields_ = [(field, ctypes.c_size_t) for field in fields.split()]

        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = Mallinfo2
        seen = []

        def allocate() -> None:
            mapped = mallinfo2().hblks
            block = np.ones(mib << 20, np.uint8)
            seen.append(mallinfo2().hblks - mapped)
            del block
            seen.append(round(mallinfo2().fordblks / 2**20))

        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()
        return tuple(seen)

    mapped, kept_mib = ray_session.get(embed_actor.__ray_call__.remote(lambda udf: allocations()), timeout=60)
    assert mapped == 0 and kept_mib >= 48
    code = textwrap.dedent(inspect.getsource(allocations)) + "print(*allocations())"
    done = bounded.run([sys.executable, "-c", code], 60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    mapped, free_mib = map(int, done.stdout.split())
    assert mapped == 1 and free_mib < 48  # the probe itself: by default glibc maps it and gives it back


def test_a_command_resolves_and_loads_a_model_without_timm_and_gets_timm_for_a_timm_tower():
    """The first import of open_clip, for a model with no timm tower, leaves timm and wandb out; a
    timm tower asked for later in the same process brings them in (open_clip's timm adapter again, the
    class its models are built of included)."""
    code = "import sys; from rayclip import model; from rayclip.model import names\n"
    code += "clip = model.load_model(model.resolve(None, 'reference'), threads=1)\n"
    code += "print([m for m in ('open_clip', 'timm', 'wandb') if m in sys.modules], clip.dim)\n"
    code += "names.import_model_libraries('convnext_base'); import open_clip\n"
    code += "adapter = open_clip.timm_model\n"
    code += "print(adapter.timm is sys.modules['timm'], open_clip.model.TimmModel is adapter.TimmModel)"
    done = bounded.run([sys.executable, "-c", code], 120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["['open_clip'] 128", "True True"]


def test_the_warm_up_starts_ray_datas_actors_and_task_workers_with_the_write_modules_loaded(ray_session):
    """On a fresh cluster, before the pool encodes: Ray Data's own actors exist, and the job's next
    task finds a worker with the write's modules loaded, as the run's write tasks will. The cluster
    is cluster.start's own, and it listens on loopback: its address and this node's are 127.0.0.1."""
    code = "import sys, ray; from rayclip import cluster; from rayclip.stages.embed import run\n"
    code += "cluster.start(); ray.get(run._warm_up(), timeout=60)\n"
    code += "print(ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address())\n"
    code += "print(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True)))\n"
    code += "print(ray.get(ray.remote(num_cpus=0)(lambda: 'rayclip.stages.embed.run' in sys.modules).remote()))"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = bounded.run([sys.executable, "-c", code], 120, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    addresses, actors, loaded = done.stdout.splitlines()[-3:]
    gcs, node = addresses.split()
    assert gcs.startswith(f"{LOOPBACK}:") and node == LOOPBACK
    assert gcs != ray_session.get_runtime_context().gcs_address  # its own, not the session's it was not told of
    assert [actors, loaded] == ["['AutoscalingCoordinator', 'datasets_stats_actor']", "True"]


def test_startup_is_cut_at_the_marks_in_the_order_they_came():
    """Each phase gets the seconds since the one before it ended; one that ended before an earlier-
    listed phase (model_build while Ray started) gets only what it added; unknown marks are left out."""
    marks = {"plan": 101.0, "ray_start": 104.0, "model_build": 102.5, "first_batch": 110.0, "other": 120.0}
    assert embed.startup_breakdown(100.0, marks) == {
        "plan": 1.0,
        "model_build": 1.5,
        "ray_start": 1.5,
        "first_batch": 6.0,
    }
    assert embed.startup_breakdown(100.0, {"plan": 99.0, "ray_start": 103.0}) == {"plan": 0.0, "ray_start": 3.0}


def test_decode_tasks_give_the_actor_layouts_vectors_and_every_run_breaks_its_startup_down(store, ray_session):
    rotten = catalog.read_manifest(store, ["media_id", "path"]).to_pylist()[0]
    (store / rotten["path"]).write_bytes(b"\xff\xd8\xff\xe0 rotten")
    spec = model.resolve(None, "reference")
    # The actor run's blocks (8 rows) are cut across by its batches (16): its rows are open_clip's own.
    layouts = {"actor": {"batch_size": 16, "blocks": 3}, "tasks": {"batch_size": 8}}
    runs = {
        where: embed.embed(store, spec, actors=1, decode=where, save_as=f"ref_{where}", **layouts[where])
        for where in layouts
    }
    # Two operators: decode tasks feeding the actor pool (not fused into the actors)
    assert "TaskPoolMapOperator[MapBatches(decode_block)]" in runs["tasks"].physical_plan
    assert "decode_block" not in runs["actor"].plan
    vectors = {}
    for where, run in runs.items():
        assert run.decode == where and run.rows_failed == 1
        assert run.failed_ids == [{"media_id": rotten["media_id"], "reason": catalog.CHANGED_OBJECT}]
        table = read_silver(store, run.model_version)
        vectors[where] = dict(zip(table.column("media_id").to_pylist(), table.column("embedding").to_pylist()))
        recorded = json.loads(layout.run_record(layout.embed_runs_dir(store), run.run_id).read_text())
        phases = recorded["startup_breakdown"]
        assert {"plan", "ray_start", "model_build", "imports", "model_load", "first_batch"} <= set(phases)
        assert set(phases) <= set(embed.STARTUP_PHASES) and min(phases.values()) >= 0
        assert 0 < recorded["startup_s"] <= recorded["wall_s"]
    assert_rows_are_open_clips(store, read_silver(store, runs["actor"].model_version))
    assert len(vectors["actor"]) > 20 and vectors["tasks"].keys() == vectors["actor"].keys()
    # Equal to fp32's rounding, not bit for bit: the two runs encode in batches of 16 and of 8, whose
    # matrix products some CPUs sum in another order (seen with AVX2 and no AVX-512: up to 6e-8 apart).
    # The decode tasks' pixels changed by one level (x ^ 1) fail it.
    ids = list(vectors["actor"])
    tasks, actor = (np.array([vectors[where][m] for m in ids]) for where in ("tasks", "actor"))
    np.testing.assert_allclose(tasks, actor, rtol=0, atol=1e-6)


def test_gpu_decode_falls_back_to_the_cpu_decode_image_by_image(ingested, monkeypatch):
    jpegs = store_objects(ingested, 3)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(png, "PNG")
    datas = [*jpegs, png.getvalue(), b"not an image"]

    # JPEGs decoded by torchvision (here on the CPU), the PNG and the bad bytes as always.
    decoded = images.decode_batch(datas, "cpu")
    assert [type(p).__name__ for p in decoded] == ["Tensor"] * 3 + ["Image", "UnidentifiedImageError"]
    clip = model.load_model(model.resolve(None, "reference"), threads=1, precision="fp32")
    on_device = clip.encode_uint8(clip.pixels.stack([clip.pixels(p) for p in decoded[:3]]))
    by_pil = clip.encode_uint8(clip.pixels.stack([clip.pixels(images.decode_image(d)) for d in jpegs]))
    assert np.sum(on_device * by_pil, axis=1).min() >= 0.999

    # The device's decoder failing: every image is decode_image's, pixel for pixel.
    def failing(*args, **kwargs):
        raise RuntimeError("nvjpeg says no")

    monkeypatch.setattr("torchvision.io.decode_jpeg", failing)
    fallen_back = images.decode_batch(datas, "cpu")
    for data, picture in zip(datas[:4], fallen_back):
        assert np.array_equal(np.asarray(picture), np.asarray(images.decode_image(data)))
    assert isinstance(fallen_back[4], Exception)


def test_decode_gpu_without_gpu_actors_is_one_line(store, capsys):
    assert cli("embed", "--data-dir", str(store), "--pretrained", "reference", "--decode", "gpu") == 2
    err = capsys.readouterr().err
    assert "--decode gpu decodes JPEGs on the actors' GPUs: give --gpus-per-actor" in err
    assert len(err.strip().splitlines()) == 1


# A `rayclip embed` in a fresh process that reports, after answering, which heavy libraries it loaded.
NO_OP_PROBE = """
import json, sys
from rayclip.cli import main
code = main(sys.argv[1:])
heavy = sorted(name for name in ("torch", "open_clip", "ray") if name in sys.modules)
print(json.dumps({"exit": code, "heavy": heavy}), file=sys.stderr)
"""


def test_a_no_op_embed_answers_from_the_catalog_without_torch_or_ray(gold_store, tmp_path):
    """Nothing new to embed or caption: the answer comes from the catalog, and neither torch nor Ray
    is imported (nor a cluster joined: $RAY_ADDRESS names one that does not exist)."""
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    command = [sys.executable, "-c", NO_OP_PROBE, "embed", "--data-dir", str(root), "--pretrained", "reference"]
    env = os.environ | {"RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": os.pathsep.join(sys.path)}
    launched = time.time()
    done = bounded.run([*command, "--json"], timeout=120, capture_output=True, env=env, text=True)
    returned = time.time()
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"exit": 0, "heavy": []}, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert document["rows_planned"] == 0 and document["rows_embedded"] == 0
    assert document["captions"]["captions_planned"] == 0 and document["captions"]["pairs_scored"] == 0
    # the same record a run with work writes, saved as always
    saved = json.loads(layout.run_record(layout.embed_runs_dir(root), document["run_id"]).read_text())
    assert saved == {key: value for key, value in document.items() if key != "captions"}
    assert saved["model_version"] == "clip_rayclip_ref_reference" and saved["precision"] in ("fp32", "bf16")
    # Nothing outside the record: the process's start until the run's clock started, and after it stopped.
    outside = saved["startup_breakdown"]
    # (a process's start time is counted in clock ticks, 10 ms on Linux)
    assert launched - 0.05 < saved["started_at"] - outside["before_run"] < saved["started_at"]
    assert saved["started_at"] + saved["wall_s"] + outside["after_run"] < returned


def test_a_no_op_under_another_models_name_still_checks_the_names(gold_store, tmp_path, capsys):
    """--save-as an embedded model_version with a model open_clip does not know: one clear line, as
    with work to do (silver's record of the model_version does not vouch for these names)."""
    root = tmp_path / "data"
    shutil.copytree(gold_store.root, root)
    args = ["--model", "NoSuchNet", "--pretrained", "none", "--save-as", "clip_rayclip_ref_reference"]
    assert cli("embed", "--data-dir", str(root), *args) == 2
    assert "unknown model 'NoSuchNet'" in capsys.readouterr().err
