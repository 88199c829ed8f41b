"""Running img2dataset: it downloads the url/caption table into the run's work folder (original
bytes, no re-encode, one Parquet shard of bytes and statuses per few hundred to 10,000 URLs) while
each shard it finishes is admitted on another thread, so checking one shard overlaps downloading
the next. img2dataset is known to this module only."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from ... import cluster
from ...images import DEFAULT_MAX_PIXELS
from ...progress import POLL_S, Progress, watch
from ...store import layout, storage
from ...store.storage import Location
from . import spawned
from .admit import Admitter

# img2dataset's shard size: about SHARDS_PER_WORKER shards per worker, so that checking one shard
# overlaps downloading the next, within bounds (tiny shards cost a worker start-up each few).
SHARD_ROWS = (256, 10_000)
SHARDS_PER_WORKER = 8
SCRATCH_PREFIX = "rayclip-img2dataset-"  # the $TMPDIR of img2dataset's processes while they run


def download_and_admit(
    table: pa.Table,
    work_dir: Location,
    admitter: Admitter,
    distributor: str,
    processes: int,
    progress: Progress | None,
    **options,
) -> None:
    """Run img2dataset on the url/caption table, admitting each shard as soon as it is finished."""
    input_file, output_dir = work_dir / "input.parquet", work_dir / "out"
    with storage.open_output(input_file) as f:
        pq.write_table(table, f)
    shard_rows = _shard_rows(table.num_rows, _workers(distributor, processes))  # sets img2dataset's environment
    _import_without_torch()  # once that environment is set (albumentations reads it at import)
    finished = threading.Event()
    # img2dataset stays on this thread (it installs a signal handler); its shards are followed on another.
    with ThreadPoolExecutor(1, thread_name_prefix="rayclip-shards") as follower:
        following = follower.submit(_follow_shards, output_dir, admitter, finished)
        try:
            with watch(lambda: admitter.rows_seen, table.num_rows, progress):
                _img2dataset(input_file, output_dir, distributor, shard_rows, processes_count=processes, **options)
        finally:
            finished.set()
        following.result()
    # A shard img2dataset gave up on (an exception, after its retry) has no output: its rows failed.
    if missing := table.num_rows - admitter.rows_seen:
        admitter.failed["shard failed"] += missing


def _downloader_env() -> dict[str, str]:
    """Settings img2dataset reads from its environment, in this process and its workers (a user's own
    setting of each wins)."""
    return {
        # Its decode checks (OpenCV) respect our pixel limit too.
        "CV_IO_MAX_IMAGE_PIXELS": os.environ.get("CV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS)),
        # albumentations (imported by img2dataset) otherwise checks the network for a newer release.
        "NO_ALBUMENTATIONS_UPDATE": os.environ.get("NO_ALBUMENTATIONS_UPDATE", "1"),
        # Its writer's S3 clients (fsspec.url_to_fs, no options) take botocore's retries from here.
        **storage.retry_env(),
    }


def _workers(distributor: str, processes: int) -> int:
    """How many shards img2dataset works on at once: its processes, or the Ray cluster's CPUs."""
    # Before img2dataset is imported here: this process runs its reader and writer's bookkeeping too,
    # and its spawned processes inherit this environment.
    os.environ.update(_downloader_env())
    if distributor == "multiprocessing":
        return processes
    import ray

    cluster.start(extra_env=_downloader_env())
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _shard_rows(rows: int, workers: int) -> int:
    low, high = SHARD_ROWS
    return min(high, max(low, math.ceil(rows / (workers * SHARDS_PER_WORKER))))


@contextlib.contextmanager
def _scratch_tmpdir() -> Iterator[None]:
    """$TMPDIR pointed, while img2dataset runs, at a folder of this run's, removed after.

    img2dataset imports wandb, which makes two temporary folders at import and removes them at
    exit; but img2dataset's spawned processes end without running exit handlers, so each would
    leave its two in the user's $TMPDIR for good. (This process's own are removed at its exit.)"""
    real = os.environ.get("TMPDIR")
    with storage.scratch_folder(SCRATCH_PREFIX) as scratch:  # in the real TMPDIR
        os.environ["TMPDIR"] = str(scratch)
        try:
            yield
        finally:
            if real is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = real


@contextlib.contextmanager
def _spawned_from_ours() -> Iterator[None]:
    """spawned.py as this process's __main__ while img2dataset starts its processes (multiprocessing's
    spawn runs the parent's main module first in each), so that they import img2dataset without
    torch; the real __main__ is back after, whatever happened. Meanwhile another thread of this
    process that spawns processes hands them spawned.py too, and one that pickles a class of its
    __main__ by reference does not find it."""
    real = sys.modules["__main__"]
    sys.modules["__main__"] = spawned
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def _import_without_torch() -> None:
    """img2dataset imported in this process as in its spawned ones (spawned.py): webdataset's torch
    stand-ins, not torch (1.5 s of a command's start). Where torch is loaded already it stays; where
    it is not, it stays importable after (an embed in this process loads it then). Meanwhile another
    thread's `import torch` would fail: none of ours imports it (the shard follower starts after)."""
    if "img2dataset" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ModuleNotFoundError: webdataset's stand-ins
    try:
        import img2dataset  # noqa: F401 - the import is the point
    finally:
        del sys.modules["torch"]


def _img2dataset(input_file: Location, output_dir: Location, distributor: str, shard_rows: int, **options) -> None:
    from img2dataset import download

    # Its logger is a spawned process whichever the distributor; "multiprocessing" spawns the workers too.
    with _scratch_tmpdir(), _spawned_from_ours():
        download(
            url_list=storage.uri(input_file),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_folder=storage.uri(output_dir),  # fsspec: a local folder or an object-store prefix
            # One Parquet object per shard, bytes and statuses together: on an object store one write
            # per shard instead of three per image, and one read back.
            output_format="parquet",
            resize_mode="no",
            # Keep the original bytes of every format: media_id is the sha256 of what the server sent.
            disable_all_reencoding=True,
            compute_hash="sha256",
            distributor=distributor,
            number_sample_per_shard=shard_rows,
            enable_wandb=False,
            **options,
        )


def _follow_shards(output_dir: Location, admitter: Admitter, finished: threading.Event) -> None:
    """Admit each shard once img2dataset has finished it (its stats file is written after its parquet)."""
    done: set[str] = set()
    while True:
        last_pass = finished.is_set()  # read before listing: the last pass sees every shard
        for stats in storage.glob(output_dir, layout.IMG2DATASET_SHARD_STATS):
            if stats.name not in done:
                done.add(stats.name)
                admitter.admit_shard(output_dir / stats.name.replace("_stats.json", ".parquet"))
        if last_pass:
            return
        finished.wait(POLL_S)
