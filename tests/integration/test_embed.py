"""Embedding on real Ray Data: execution signals, silver contract, exact rows, incremental runs, and the
streaming planner against the planner in the driver."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pytest
from helpers import bounded
from helpers.silver import media_ids, write_manifest, write_silver
from helpers.site import GOOD_IMAGES
from helpers.stores import assert_rows_are_open_clips, cli, read_silver

from rayclip import UserError, model
from rayclip.stages import embed
from rayclip.store import catalog, layout

REFERENCE = "clip_rayclip_ref_reference"


def test_cli_embed_seed_spelling_prints_plan_and_is_idempotent(store, ray_session, capsys):
    """No test-only setting: `rayclip embed` itself waits for its whole pool, so every actor works."""
    rc = cli(
        "embed",
        "--data-dir",
        str(store),
        "--actors",
        "2",
        "--batch_size",
        "8",
        "--limit",
        "5000",
        "--pretrained",
        "none",
        "--no-captions",  # the captions stage is test_captions'
    )
    out = capsys.readouterr()
    assert rc == 0
    assert "ActorPoolMapOperator[MapBatches(EmbedUDF)]" in out.out
    assert "random weights" in out.err
    run = json.loads(next(layout.embed_runs_dir(store).glob("*.json")).read_text())
    assert run["model_version"] == "clip_vit_b32_none"
    assert run["rows_embedded"] == GOOD_IMAGES and run["rows_failed"] == 0
    assert run["actors_used"] > 1 and run["tasks"] > 1 and run["blocks"] == 16
    # Start-up apart from the steady rate, and the time of each stage.
    assert 0 < run["startup_s"] < run["wall_s"] and run["steady_images_per_s"] > run["images_per_s"] > 0
    assert run["decode_s"] > 0 and run["encode_s"] > 0 and run["write_s"] > 0
    assert "ActorPoolMapOperator[MapBatches(EmbedUDF)]" in run["plan"]
    # The whole command's time outside the run, in its record; the caller's Ray session is left up.
    assert run["startup_breakdown"]["before_run"] > 0 and 0 <= run["startup_breakdown"]["after_run"] < run["wall_s"]
    assert ray_session.is_initialized()

    table = read_silver(store, "clip_vit_b32_none")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 512)
    assert table.schema.field("media_id").type == pa.string()
    assert sorted(table.column("media_id").to_pylist()) == sorted(
        set(catalog.read_manifest(store).column("media_id").to_pylist())
    )
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # Every file Ray wrote is committed, and the run's work folder is gone.
    assert sorted(store.glob("silver/embeddings/*/dt=*/*.parquet")) == catalog.silver_files(store, "clip_vit_b32_none")
    assert not list((store / "silver" / "_work").glob("*"))

    rerun = ["--actors", "2", "--batch_size", "8", "--pretrained", "none", "--no-captions"]
    assert cli("embed", "--data-dir", str(store), *rerun) == 0 and "nothing new to embed" in capsys.readouterr().out
    assert read_silver(store, "clip_vit_b32_none").num_rows == GOOD_IMAGES


# Batches that cut across blocks (12 rows a block in batches of 5; test_embed_startup's actor run
# has 8 rows a block in batches of 16). Two blocks for two actors also checks that every actor works
# when there is little work: without waiting for the whole pool, the first actor up would take both.
def test_rows_are_never_shifted_between_media_ids(store, ray_session):
    report = embed.embed(store, model.resolve(None, "reference"), actors=2, batch_size=5, blocks=2)
    assert report.rows_embedded == GOOD_IMAGES and report.actors_used == 2
    assert_rows_are_open_clips(store, read_silver(store, report.model_version))


def test_incremental_runs_and_bad_objects(store, ray_session):
    spec = model.resolve(None, "reference")
    first = embed.embed(store, spec, actors=1, batch_size=4, limit=10)
    assert first.rows_embedded == 10
    # After ingest, one object rots (no longer decodes) and another is overwritten with a different
    # image that decodes fine: neither is embedded, since an object's bytes must hash to its media_id.
    done = set(read_silver(store, spec.model_version).column("media_id").to_pylist())
    rotten, swapped = [r for r in catalog.read_manifest(store).to_pylist() if r["media_id"] not in done][:2]
    (store / rotten["path"]).write_bytes(b"\xff\xd8\xff\xe0 rotten")
    other = next(r for r in catalog.read_manifest(store).to_pylist() if r["media_id"] in done)
    (store / swapped["path"]).write_bytes((store / other["path"]).read_bytes())

    second = embed.embed(store, spec, actors=1, batch_size=4, dt="2026-01-02")
    assert (second.rows_planned, second.rows_embedded, second.rows_failed) == (GOOD_IMAGES - 10, GOOD_IMAGES - 12, 2)
    assert second.partition.endswith("dt=2026-01-02")
    assert sorted(second.failed_ids, key=lambda f: f["media_id"]) == sorted(
        [{"media_id": r["media_id"], "reason": catalog.CHANGED_OBJECT} for r in (rotten, swapped)],
        key=lambda f: f["media_id"],
    )
    assert len(list((store / second.partition).glob("*.parquet"))) >= 1
    embedded = read_silver(store, spec.model_version).column("media_id").to_pylist()
    assert rotten["media_id"] not in embedded and swapped["media_id"] not in embedded


def test_the_driver_waits_for_every_batchs_record_before_it_reads_the_stats(ray_session, monkeypatch):
    """The actors' records (and the caption rows sent before each) come from another caller than
    the driver, so they may arrive after the write has ended: the driver waits for all of them, and
    for no more than RECORDS_WAIT_S when some never come."""
    import threading

    import ray

    from rayclip.stages.embed import run, worker

    stats = ray.remote(num_cpus=0)(worker.RunStats).remote()
    late = threading.Timer(0.5, lambda: stats.record.remote(("node", "actor"), 7, [], {}, 0.0))
    late.start()
    run._all_recorded(stats, 7)
    assert ray.get(stats.rows_done.remote()) == 7
    monkeypatch.setattr(run, "RECORDS_WAIT_S", 0.2)
    run._all_recorded(stats, 8)  # one row never recorded: it returns all the same
    ray.kill(stats)


def test_missing_weights_fail_fast_with_one_line(store, tmp_path):
    """Offline (HF_HUB_OFFLINE) with an empty Hugging Face cache, whatever this host has cached or reaches."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache")}
    cmd = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(store)]  # ViT-B-32 / openai
    done = bounded.run(cmd, 120, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "weights for ViT-B-32/openai are not cached and cannot be downloaded here" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_more_gpus_than_the_cluster_has_is_refused_not_left_pending(store, ray_session):
    gpus = float(ray_session.cluster_resources().get("GPU", 0))  # 0 here; whatever a GPU host has
    per_actor = gpus / 2 + 1
    message = f"need {2 * per_actor} GPUs; the cluster has {gpus}"
    with pytest.raises(UserError, match=re.escape(message)):
        embed.embed(store, model.resolve(None, "reference"), actors=2, gpus_per_actor=per_actor)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "NoSuchNet"], "unknown model 'NoSuchNet'"),
        (["--model", "ViT-B-32", "--pretrained", "nosuchtag"], "unknown pretrained tag 'nosuchtag' for ViT-B-32"),
        (["--pretrained", "missing.pt"], "checkpoint file not found"),
        (["--model", "ViT-B-32", "--pretrained", "reference"], "--pretrained reference is the RayCLIP-Ref model"),
    ],
)
def test_bad_model_names_get_one_clear_line(store, capsys, args, message):
    assert cli("embed", "--data-dir", str(store), *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_manifest_and_bad_date(tmp_path, capsys):
    assert cli("embed", "--data-dir", str(tmp_path / "d"), "--pretrained", "none") == 2
    assert "run `rayclip ingest` first" in capsys.readouterr().err
    with pytest.raises(Exception, match="YYYY-MM-DD"):
        embed.embed(tmp_path, model.resolve(None, "none"), dt="26/11/2026")


@pytest.mark.parametrize("planner", ["in the driver", "streaming"])
def test_both_planners_plan_the_same_rows(tmp_path, ray_session, monkeypatch, planner):
    """Duplicated manifest rows, some ids already embedded: each planner
    gives one row per new media_id with its smallest path, in media_id order, and --limit takes the
    smallest media_ids."""
    if planner == "streaming":
        monkeypatch.setattr(embed.plan, "DRIVER_PLAN_ROWS", 0)
        monkeypatch.setattr(embed.plan, "_plan_in_driver", None)  # never called
    root = tmp_path / "data"
    ids = media_ids(300)
    write_manifest(root, ids[:200], seed=0)
    write_manifest(root, ids[150:] + ids[:20], seed=1)  # 150..199 and 0..19 twice
    write_silver(root, "2026-01-01", ids[100:180], np.eye(80, 128))
    write_silver(root, "2026-01-02", ids[250:260], np.eye(10, 128))

    done = set(ids[100:180] + ids[250:260])
    smallest: dict[str, str] = {}
    for row in catalog.read_manifest(root, ["media_id", "path"]).to_pylist():
        if row["media_id"] not in done:
            smallest[row["media_id"]] = min(smallest.get(row["media_id"], row["path"]), row["path"])
    expected = [{"media_id": m, "path": smallest[m]} for m in sorted(smallest)]

    def planned(**kwargs) -> list[dict]:
        work = embed.plan_work(root, REFERENCE, **kwargs)
        return pa.concat_tables(work.iter_batches(batch_format="pyarrow", batch_size=None)).to_pylist()

    assert planned() == expected
    assert len(expected) == 300 - 90
    assert planned(limit=7) == expected[:7]
    assert len(planned(force=True)) == 300
