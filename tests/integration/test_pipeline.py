"""The Python API's pipeline entry points (rayclip.run_demo, the stage wrapper) and ModelSpec's JSON round trip."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bounded
from helpers.silver import clustered, media_ids, reference_spec, write_manifest, write_silver

import rayclip
from rayclip import Hooks, ModelSpec, Searcher, SearchOptions, Term, UserError, pipeline
from rayclip.stages import captions, embed, index, ingest
from rayclip.store import layout, storage

DEMO_IMAGES = 16
# What Ray and img2dataset print on their own (seen in `make demo | cat` before this was fixed).
LIBRARY_CHATTER = re.compile(
    r"\bINFO\b|\bWARNING\b|core_worker|logging_progress|Sharding file|File sharded|Downloading starting"
    r"|worker\s+- success|total\s+- success|it/s\]|Starting the downloading|Started a local Ray"
)
STAGES = ("ingest download", "ingest store", "embed", "index", "eval")


class Recorder:
    """Hooks that keep what a run reported instead of drawing it."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.progress: dict[str, list[tuple[int, int]]] = {}
        self.closed: list[str] = []

    def make_progress(self, label: str, terminal):
        calls = self.progress.setdefault(label, [])

        class Callback:
            def __call__(self, done: int, total: int) -> None:
                calls.append((done, total))

            def close(inner) -> None:  # noqa: N805 - the recorder's own list
                self.closed.append(label)

        return Callback()

    def hooks(self) -> Hooks:
        return Hooks(progress=self.make_progress, report=lambda event, terminal: self.events.append(event))


# ------------------------------------------------------------------ the demo from Python


@pytest.mark.slow
def test_run_demo_from_python_reports_every_stage_prints_nothing_and_reruns_fetching_nothing(
    tmp_path, ray_session, capfd
):
    seen = Recorder()
    demo = rayclip.run_demo(str(tmp_path / "demo"), images=DEMO_IMAGES, actors=1, batch_size=8, hooks=seen.hooks())
    out, _ = capfd.readouterr()
    assert out == ""  # the library reports through the hooks; only the CLI prints

    stages = [pipeline.DemoSite, ingest.IngestReport, embed.EmbedReport, captions.CaptionReport, index.BuildReport]
    assert [type(e) for e in seen.events] == stages
    assert seen.events[0] == demo.site and demo.site.images == DEMO_IMAGES and demo.site.metadata.is_file()
    run = demo.run
    assert run.ingest.admitted == DEMO_IMAGES and run.embed.rows_embedded == DEMO_IMAGES
    assert run.build.count == DEMO_IMAGES == run.eval.images
    assert (
        run.captions.pairs_scored == DEMO_IMAGES
        # the images' captions are encoded by the image run's actors, any left by the caption stage
        and run.searcher.build_info.captions["count"] == run.embed.captions_embedded + run.captions.captions_embedded
        and run.embed.captions_embedded > 0
    )
    # What the "done when" asks of a demo: clip_score filters, and captions are searchable.
    caption = demo.samples[0][0]
    assert run.searcher.search_text(caption, k=3, where="clip_score > 0")
    found = run.searcher.find([[Term("text", caption)]], SearchOptions(k=3, over="captions"))[0]
    assert found[0].caption == caption and found[0].score > 0.99
    assert run.eval.model_version == "clip_rayclip_ref_reference" and run.eval.build_id == run.build.build_id
    assert json.loads(Path(run.eval.path).read_text())["text_to_image"]["10"] > 0.5
    # (no "captions": the image run's actors encoded them all, so the caption stage counted none)
    assert seen.progress["captions"] == []
    for label in ("ingest download", "ingest store", "embed", "index", "eval"):
        done, total = seen.progress[label][-1]
        assert done == total > 0, label
    assert sorted(seen.closed) == sorted(seen.progress)  # every callback closed when its stage ended
    # Each stage's library output is in a log named after its run, beside the run's record. (Only the
    # ingest's is sure to have lines here: Ray Data's driver logger keeps the stream it got when an
    # earlier test first used it, so in a long-lived process its lines need not reach a later run's log.)
    for runs, run_id in ((layout.ingest_runs_dir, run.ingest.run_id),):
        assert (runs(tmp_path / "demo") / f"{run_id}.log").is_file()
    # The sample queries are captions of the generated set: each finds an image carrying it.
    assert len(demo.samples) == pipeline.DEMO_SAMPLE_QUERIES
    for caption, results in demo.samples:
        assert len(results) == 3 and caption in {r.caption for r in results}

    # The demo serves its images on DEMO_PORT, so a rerun's URLs are those the manifest holds: it
    # hands img2dataset nothing and skips every image as known.
    assert demo.site.base_url == f"http://127.0.0.1:{pipeline.DEMO_PORT}", "DEMO_PORT was taken by another process"
    again = rayclip.run_demo(str(tmp_path / "demo"), images=DEMO_IMAGES, actors=1, batch_size=8)
    assert again.site.base_url == demo.site.base_url
    assert again.run.ingest.admitted == 0 and again.run.ingest.skipped_known_urls == DEMO_IMAGES
    assert again.run.embed.rows_embedded == 0 and again.run.build.count == DEMO_IMAGES


# ------------------------------------------------------------------ the demo from the CLI, off a terminal
# Every test that serves the demo's site on its fixed port lives in this file (one test worker).


def rayclip_process(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`rayclip ARGS` in its own process, off a terminal, starting its own Ray (RAY_ADDRESS left out)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(rayclip.__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "rayclip.cli", *args]
    return bounded.run(cmd, timeout, capture_output=True, text=True, env=env)  # the tree killed at timeout


@pytest.mark.slow
def test_pipeline_off_a_terminal_prints_no_library_logs_one_plan_and_two_lines_per_stage(tmp_path):
    done = rayclip_process("demo", "--images", "24", "--data-dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if LIBRARY_CHATTER.search(line)]
    assert sum("Physical Plan (Optimized)" in line for line in lines) == 1
    assert not [line for line in lines if "Logical Plan" in line or line == "-------- Physical Plan --------"]
    for stage in STAGES:
        progress = [line for line in lines if line.startswith(f"{stage}: ")]
        assert len(progress) == 2, (stage, progress)
        assert re.fullmatch(rf"{stage}: (\d+)/\1 in [\d.]+ s \([\d.]+/s\)", progress[1]), progress[1]
    # What the libraries said went to the runs' log files instead.
    root = tmp_path / "demo"
    (ingest_log,) = layout.ingest_runs_dir(root).glob("*.log")
    (embed_log,) = layout.embed_runs_dir(root).glob("*.log")
    assert ingest_log.with_suffix(".json").is_file() and embed_log.with_suffix(".json").is_file()
    assert "Downloading starting" in ingest_log.read_text()
    assert "core_worker" in embed_log.read_text() and "Started a local Ray" in embed_log.read_text()


# ------------------------------------------------------------------ the stage wrapper


def test_stage_puts_library_output_in_the_log_and_progress_on_the_terminal(tmp_path, capfd):
    seen = Recorder()
    runs = tmp_path / "runs"
    with pipeline.stage(runs, seen.hooks()) as running:
        progress = running.progress("work")
        print("chatter from a library")
        os.write(2, b"chatter from a child process\n")
        running.terminal.write("for the user\n")
        progress(1, 1)
        running.report("news")
    running.keep_log_as("run-1")
    out, err = capfd.readouterr()
    log = (runs / "run-1.log").read_text()
    assert "chatter from a library" in log and "chatter from a child process" in log
    assert "chatter" not in out + err and "for the user" in out and "for the user" not in log
    assert seen.progress == {"work": [(1, 1)]} and seen.closed == ["work"] and seen.events == ["news"]


def test_stage_without_a_runs_dir_captures_nothing_and_quiet_hooks_make_no_progress(tmp_path, capfd):
    with pipeline.stage(None) as running:
        print("said")
        assert running.progress("work") is None
    assert capfd.readouterr().out == "said\n" and not list(tmp_path.iterdir())


# ------------------------------------------------------------------ ModelSpec <-> JSON


SPECS = [
    ModelSpec("ViT-B-32", "openai"),
    ModelSpec("ViT-B-32", "none", version="bench_vectors"),
    ModelSpec("ViT-B-32", "/models/ft.pt", "/models/ft.pt", "ab" * 32, precision="bf16"),
    ModelSpec("hf-hub:org/model", "hf-hub"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.model_version)
def test_model_spec_round_trips_through_json(spec):
    written = json.loads(json.dumps(spec.to_dict()))
    assert written["model_version"] == spec.model_version
    assert ModelSpec.from_dict(written) == spec


def test_model_spec_reads_the_shapes_older_data_holds():
    # Before precision was recorded (old _model.json and build.json "model").
    before_precision = {
        "name": "ViT-B-32",
        "pretrained": "openai",
        "checkpoint": None,
        "checkpoint_sha256": None,
        "version": None,
        "model_version": "clip_vit_b32_openai",
    }
    assert ModelSpec.from_dict(before_precision) == ModelSpec("ViT-B-32", "openai")
    # Hand-written by an older benchmark: no `version`, yet a model_version of its own, which is kept.
    named = {"name": "ViT-B-32", "pretrained": "none", "checkpoint": None, "model_version": "bench_vectors"}
    assert ModelSpec.from_dict(named).model_version == "bench_vectors"
    # Keys a later version may add are ignored.
    assert ModelSpec.from_dict(before_precision | {"dim": 512}) == ModelSpec("ViT-B-32", "openai")
    with pytest.raises(UserError, match="lacks pretrained"):
        ModelSpec.from_dict({"name": "ViT-B-32", "model_version": "x"})


def _old_shape(spec: ModelSpec) -> dict:
    return {k: v for k, v in spec.to_dict().items() if k != "precision"}


def test_index_writes_the_full_spec_from_an_old_model_file_and_the_searcher_reads_an_old_build(tmp_path):
    root = tmp_path / "data"
    ids = media_ids(40)
    write_manifest(root, ids)
    write_silver(root, "2026-01-01", ids, clustered(40))
    spec = reference_spec()
    storage.write_json_atomic(layout.silver_model_file(root, spec.model_version), _old_shape(spec))

    report = index.build(root)
    build_json = layout.build_dir(root, report.model_version, report.build_id) / "build.json"
    info = json.loads(build_json.read_text())
    assert info["model"] == spec.to_dict()  # the shape to_dict() writes, precision included (unknown: null)

    storage.write_json_atomic(build_json, info | {"model": _old_shape(spec)})  # a build written before precision
    searcher = Searcher.open(root)
    assert searcher.model.spec.checkpoint_sha256 == spec.checkpoint_sha256
    assert searcher.model_version == spec.model_version and len(searcher.search_text("a dog", k=3)) == 3
