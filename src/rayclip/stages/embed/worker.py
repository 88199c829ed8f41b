"""What runs in Ray's workers: the per-run stats actor (which also collects the caption rows), the
decoder (in an actor or a decode task), and the actor that embeds a batch (EmbedUDF)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ...errors import DECODE_ERROR
from ...images import decode_batch, decode_image
from ...model import (
    ClipModel,
    hold_freed_memory,
    import_model_libraries,
)
from ...store import catalog, layout, silver, storage
from ...store.catalog import Refused

if TYPE_CHECKING:
    from ray.actor import ActorHandle

# In an actor: when its worker process had Python, Ray and this module loaded (the actor's own start).
IMPORTED_AT = time.time()
CALLS_PER_ACTOR = 2  # one batch decoding while another encodes
DECODE_FAILED = Refused(DECODE_ERROR)  # the bytes hash right but are no image the decoder takes


class RunStats:
    """What a run's actors hand back to its driver (a Ray actor with no CPU, one per run): what they
    did, and the caption rows they encoded, written once the images are committed. One actor, not
    two: each is a process of its own to start."""

    def __init__(self) -> None:
        self.caption_tables: list[pa.Table] = []
        self.rows_by_worker: Counter = Counter()  # (node_id, actor_id) -> rows embedded
        self.failures: list[tuple[str, str]] = []
        self.seconds: Counter = Counter()  # stage -> seconds, summed over actors
        self.started: dict[tuple[str, str], dict[str, float]] = {}  # worker -> its start-up marks
        self.first_encode: dict[tuple[str, str], float] = {}  # worker -> wall clock of its first encode
        self.actors: list[ActorHandle] = []  # the run's embed actors (end_actors)
        self.ended = False

    def actor_started(self, worker: tuple[str, str], marks: dict[str, float], actor: ActorHandle) -> None:
        self.started[worker] = marks
        self.actors.append(actor)
        if self.ended:  # up after the run ended (it failed while the pool started)
            self.end_actors()

    def end_actors(self) -> None:
        """End the run's embed actors. Ray Data leaves a pool it is done with to Python's garbage
        collector, and a failed run's error can keep it from being collected (seen in CI: an actor
        held its CPU for minutes after the run): in a long-lived process (a notebook, which keeps the
        last error; a server) each actor would hold its CPUs, and the next job would wait for them."""
        import ray

        self.ended = True
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()

    def record_decode(self, failures: list[tuple[str, str]], seconds: float) -> None:
        """What a decode task (decode="tasks") did: its failures and its seconds."""
        self.failures.extend(failures)
        self.seconds["decode"] += seconds

    def record(
        self,
        worker: tuple[str, str],
        ok: int,
        failures: list[tuple[str, str]],
        seconds: dict,
        encode_at: float,
        captions: pa.Table | None = None,
    ) -> None:
        """What an actor did with a batch, and the caption rows it encoded for it: one call per batch
        (each call is work for this actor's process beside the encoders)."""
        if captions is not None:
            self.caption_tables.append(captions)
        self.rows_by_worker[worker] += ok
        self.failures.extend(failures)
        self.seconds.update(seconds)
        self.first_encode[worker] = min(self.first_encode.get(worker, encode_at), encode_at)

    def summary(self) -> tuple[list, list, dict, dict]:
        """(workers that embedded rows, failures, seconds by stage, the start-up marks of the actor
        that encoded first, its first encode included)."""
        workers = [worker for worker, rows in self.rows_by_worker.items() if rows]
        first = min(self.first_encode, key=self.first_encode.get, default=None)
        marks = self.started.get(first, {}) | {"first_batch": self.first_encode[first]} if first else {}
        return workers, self.failures, dict(self.seconds), marks

    def rows_done(self) -> int:
        return sum(self.rows_by_worker.values()) + len(self.failures)

    def write_captions(self, data_root: str, model_version: str, day: str, run_id: str) -> int:
        """The caption rows in files of silver.CAPTION_ROWS_PER_FILE (not yet committed); how many."""
        if not self.caption_tables:
            return 0
        rows, per_file = pa.concat_tables(self.caption_tables), silver.CAPTION_ROWS_PER_FILE
        files = (rows.slice(start, per_file) for start in range(0, rows.num_rows, per_file))
        silver.write_files(storage.location(data_root), model_version, layout.CAPTIONS, day, run_id, files)
        return rows.num_rows


class Decoder:
    """(media_id, path) rows → the model's uint8 input pixels: read from the store (only bytes that hash
    to their media_id), decode (rayclip.images, the one decode path), resize and crop (the model's
    `pixels`). The same code in an actor (decode="actor", "gpu") and in a decode task ("tasks").

    With `device`, JPEGs are decoded together on it (images.decode_batch) and the rest as always.
    `threads` read (and, without a device, decode) that many images at once: Pillow and torch release
    the GIL while they work. Picklable: the store client and the threads are made where it runs.
    """

    def __init__(self, data_root: str, pixels: Callable, threads: int = 1, device: str | None = None) -> None:
        self.data_root, self.pixels, self.threads, self.device = data_root, pixels, threads, device
        self._start()

    def _start(self) -> None:
        self._root = storage.location(self.data_root)  # this process's own client for the data root
        self._pool = ThreadPoolExecutor(self.threads, "rayclip-decode") if self.threads > 1 else None

    def __getstate__(self) -> dict:
        return {key: self.__dict__[key] for key in ("data_root", "pixels", "threads", "device")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start()

    def _map(self, function: Callable, items: Iterable) -> list:
        return list(self._pool.map(function, items) if self._pool else map(function, items))

    def __call__(self, media_ids: Iterable[str], paths: Iterable[str]) -> tuple[list[str], object, list]:
        """(media_ids that decoded, their pixels as one uint8 NCHW tensor or None, (media_id, why) failures)."""
        read = self._map(self._read, zip(media_ids, paths))
        if self.device:
            pictures = iter(decode_batch([data for _, data in read if not isinstance(data, Refused)], self.device))
            shaped = [(m, data if isinstance(data, Refused) else self._shaped(next(pictures))) for m, data in read]
        else:
            shaped = self._map(self._decoded, read)
        done = [(media_id, tensor) for media_id, tensor in shaped if not isinstance(tensor, Refused)]
        tensors = [tensor.to(self.device) if self.device else tensor for _, tensor in done]
        failures = [(media_id, refused.reason) for media_id, refused in shaped if isinstance(refused, Refused)]
        return [media_id for media_id, _ in done], self.pixels.stack(tensors) if tensors else None, failures

    def _read(self, row: tuple[str, str]) -> tuple[str, bytes | Refused]:
        media_id, path = row
        return media_id, catalog.read_object(self._root, path, media_id)  # a store that gives up fails the job

    def _decoded(self, read: tuple[str, bytes | Refused]) -> tuple[str, object]:
        """(media_id, its pixels or why not)."""
        media_id, data = read
        if isinstance(data, Refused):
            return media_id, data
        try:
            picture = decode_image(data)
        except Exception as exc:  # a bad image must not kill the job; it is counted and skipped
            picture = exc
        return media_id, self._shaped(picture)

    def _shaped(self, picture) -> object:
        """A decoded picture's pixels, or why it has none (`picture` is the decoder's exception)."""
        return DECODE_FAILED if isinstance(picture, Exception) else self.pixels(picture)


def decode_block(batch: dict, decoder: Decoder, stats) -> dict:
    """decode="tasks": a Ray Data task's block of (media_id, path) rows → (media_id, uint8 pixels) for
    the actors, which only normalise and encode; failures go to the run's stats."""
    started = time.perf_counter()
    ids, pixels, failures = decoder(batch["media_id"], batch["path"])
    stats.record_decode.remote(failures, time.perf_counter() - started)
    pixels = pixels.numpy() if pixels is not None else np.zeros((0, 3, *decoder.pixels.size), np.uint8)
    return {"media_id": np.array(ids, dtype=object), "pixels": pixels}


class EmbedUDF:
    """Rebuilds the model once per actor from the run's shared parts; turns batches into silver rows.

    A batch is either (media_id, path) rows, which the actor reads and decodes itself (decode="actor"
    or "gpu"), or (media_id, pixels) from the decode tasks ("tasks"), which it only normalises and
    encodes. Ray Data calls it from CALLS_PER_ACTOR threads at once; decoding runs unlocked, encoding
    under a lock, so the model always has the next batch ready and never shares its cores. In its turn
    the batch's captions go first: the other call, just done, decodes its next batch meanwhile, and on
    an AVX-512 CPU the text tower loses less to that than the image tower does (on an AVX2 one it loses
    more, about 1 % of a run; docs/benchmarks.md). When a GPU
    encodes, the actor's CPU threads would idle, and one PIL decoder cannot feed a GPU: an actor that
    decodes then reads and decodes a batch on `decode_threads` threads.
    """

    def __init__(
        self,
        parts,
        model: str,
        data_root: str,
        threads: int,
        decode_threads: int,
        decode: str,
        device: str,
        stats,
    ) -> None:
        import ray

        marks = {"actor_process": IMPORTED_AT}
        hold_freed_memory()  # before the model's first batch
        # By name, before the parts: unpickling them (open_clip's transforms) imports open_clip.
        import_model_libraries(model)
        marks["imports"] = time.time()
        parts = ray.get(parts[0]) if isinstance(parts, list) else parts  # [ObjectRef]: Ray passes it unresolved
        self.model = ClipModel.from_parts(parts, device=device, threads=threads)
        marks["model_load"] = time.time()
        jpegs_on = device if decode == "gpu" else None
        self.decoder = Decoder(data_root, self.model.pixels, decode_threads, jpegs_on)
        self.stats = stats
        self.encode_lock = threading.Lock()
        context = ray.get_runtime_context()
        self.worker = (context.get_node_id(), context.get_actor_id())
        if stats is not None:  # registered before the actor counts as up: the pool's end reaches it
            ray.get(stats.actor_started.remote(self.worker, marks, context.current_actor))

    def __call__(self, batch: dict) -> pa.Table:
        started = time.perf_counter()
        if "pixels" in batch:  # decoded by the decode tasks
            ids, pixels, failures = list(batch["media_id"]), batch["pixels"], []
        else:
            ids, pixels, failures = self.decoder(batch["media_id"], batch["path"])
        decoded = time.perf_counter()
        texts = _captions_of(batch, ids)
        with self.encode_lock:
            encode_at, turn = time.time(), time.perf_counter()
            captions = None
            if texts:  # the same model's text tower, in the same turn at the cores, first
                text_ids = pa.array([layout.caption_id(text) for text in texts], pa.string())
                captions = silver.captions_table(text_ids, pa.array(texts, pa.string()), self.model.encode_texts(texts))
            encode_started = time.perf_counter()
            vectors = self.model.encode_uint8(pixels) if ids else np.zeros((0, self.model.dim), np.float32)
            encoded = time.perf_counter()
        seconds = {"decode": decoded - started, "captions": encode_started - turn, "encode": encoded - encode_started}
        self.stats.record.remote(self.worker, len(ids), failures, seconds, encode_at, captions)
        return silver.embeddings_table(ids, vectors)


def _captions_of(batch: dict, ids: list[str]) -> list[str]:
    """The new caption texts the batch's decoded images carry (its `captions` column, when planned)."""
    if "captions" not in batch:
        return []
    by_id = dict(zip(batch["media_id"], batch["captions"]))
    return [str(text) for media_id in ids for text in by_id[media_id]]
