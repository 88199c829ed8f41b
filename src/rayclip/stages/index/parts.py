"""The steps of an index build: train once, add parts, finish. Each step is a plain function that runs
as a Ray task (its memory declared, on whichever node has it) or inline in this process; the same
steps in the same order either way, so a distributed build equals a single-process one.

- train: one task reads a uniform random sample of all chosen rows (held-out tuning queries and the
  training vectors), trains the coarse quantizer and codebooks and writes trained.faiss.
- add: one task per part (a contiguous range of at most `part_vectors` faiss_ids) reads trained.faiss
  and its rows, adds them with their global ids, writes the part and returns the tuning queries'
  exact neighbours among its vectors.
- finish: the parts merged in RAM into index.faiss, merged on disk into index.faiss + index.ivfdata,
  or merged in groups into K shards; the recall tuning runs in the task that holds the result.
trained.faiss and the parts are working files (layout.parts_dir), deleted before build.json.
Only small things cross between tasks and the driver: file names, row numbers, the tuning queries
and their neighbours. The driver never holds the index nor all the vectors.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa

from ... import ann, cluster, faults
from ...errors import UserError
from ...progress import Progress
from ...store import catalog, layout, storage
from ...store.storage import Location

SLACK = 1.5  # a task's declared memory over the bytes it holds (FAISS's working buffers, Arrow's reads)
MIN_TASK_MEMORY = 256 << 20
COPY_CHUNK = 16 << 20  # bytes in memory at a time while a file is copied


@dataclasses.dataclass(frozen=True)
class Rows:
    """Chosen silver rows: per file, the row numbers read from it, in faiss_id order."""

    files: list[Location]
    rows: list[np.ndarray]

    @property
    def count(self) -> int:
        return int(sum(len(r) for r in self.rows))


def rows_at(files: list[Location], file_idx: np.ndarray, row_idx: np.ndarray, positions: np.ndarray) -> Rows:
    """The rows of these sorted positions (faiss_ids), naming only the files that hold some."""
    held = [(f, row_idx[positions][file_idx[positions] == i]) for i, f in enumerate(files)]
    held = [(f, rows) for f, rows in held if len(rows)]
    return Rows([f for f, _ in held], [rows for _, rows in held])


def check_vectors(vectors: np.ndarray, f: Location, tolerance: float) -> None:
    if not np.isfinite(vectors).all():
        raise UserError(f"silver file {f.name} holds NaN or infinite vectors; re-embed with --force")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and np.abs(norms - 1).max() > tolerance:
        raise UserError(f"silver file {f.name} holds vectors that are not L2-normalised; re-embed with --force")


def read_vectors(source: Rows, tolerance: float) -> np.ndarray:
    """The rows' vectors, one file at a time into one array: the part is held once (and one file's
    vectors beside it), not once in pieces and again joined."""
    held, filled = None, 0
    for f, rows in zip(source.files, source.rows):
        vectors = catalog.vector_matrix(catalog.read_parquet(f, ["embedding"]))
        if held is None:
            held = np.empty((source.count, vectors.shape[1]), np.float32)
        np.take(vectors, rows, axis=0, out=held[filled : filled + len(rows)])
        check_vectors(held[filled : filled + len(rows)], f, tolerance)
        filled += len(rows)
        del vectors
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps a freed read's pages otherwise
    return held if held is not None else np.zeros((0, 0), np.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every step of one build needs to know."""

    index_type: str
    dim: int
    folder: Location  # the build's folder: its steps' working files (layout.parts_dir), the result
    form: str  # BuildInfo.form: "single", "ondisk" or "shards"
    shards: int
    tolerance: float  # how far from unit length a silver vector may be


def new_index(index_type: str, dim: int):
    import faiss

    if index_type == ann.FLAT:
        return faiss.IndexFlatIP(dim)
    try:
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UserError(
            f"unknown --index-type {index_type!r}; use auto, flat or a FAISS factory string (HNSW32, IVF1024,Flat)"
        ) from None
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index)) if ann.nlist_of(index) is not None else None
    if hasattr(ivf, "do_polysemous_training"):
        # index_factory turns on polysemous training for PQ codes: minutes of CPU for a Hamming
        # filter that inner-product search never uses.
        ivf.do_polysemous_training = False
    return index


# The steps. Each returns only small things; what it makes goes to files in plan.folder.
def train(plan: Plan, sample: Rows, is_query: np.ndarray, is_training: np.ndarray) -> np.ndarray:
    """Train on the sample's training rows (a type that needs no training: nothing) and write
    trained.faiss; returns the tuning queries' vectors."""
    vectors = read_vectors(sample, plan.tolerance)
    index = new_index(plan.index_type, plan.dim)
    if not index.is_trained:
        index.train(vectors[is_training])
    faults.point("index.train")  # trained, not yet written
    catalog.write_index(layout.trained_file(plan.folder), index)
    return vectors[is_query]


def add(plan: Plan, part: int, source: Rows, first: int, empty_truth: ann.Truth) -> tuple[np.ndarray, np.ndarray]:
    """Add one part's vectors, with their global ids first.., to a copy of trained.faiss and write it;
    returns the tuning queries' exact neighbours among them (ids, scores). `empty_truth`: the queries with no
    neighbours yet, one object every add shares (Runner.share), so this task keeps its own."""
    truth = ann.Truth.empty(empty_truth.queries, empty_truth.query_ids, empty_truth.ids.shape[1])
    vectors = read_vectors(source, plan.tolerance)
    ids = np.arange(first, first + len(vectors), dtype=np.int64)
    index = catalog.read_index(layout.trained_file(plan.folder))
    if ann.mergeable(plan.index_type):
        index.add_with_ids(vectors, ids)
    else:  # flat, HNSW, fast-scan and Refine number what they hold from 0: built in one part (first == 0)
        index.add(vectors)
    faults.point("index.add")  # a part indexed, not yet written
    catalog.write_index(layout.part_file(plan.folder, part), index)
    truth.add(vectors, ids)
    return truth.ids, truth.scores


def _merged(plan: Plan, parts: list[int], onto: Location | None = None):
    """The parts merged in RAM on trained.faiss, or onto the index file `onto` (a base build's shard on
    the same quantizer); a lone part is the index itself."""
    import faiss

    if len(parts) == 1 and onto is None:
        return catalog.read_index(layout.part_file(plan.folder, parts[0]))
    index = catalog.read_index(layout.trained_file(plan.folder) if onto is None else onto)
    ivf = faiss.extract_index_ivf(index)
    for part in parts:
        held = catalog.read_index(layout.part_file(plan.folder, part))  # owns the lists extract_index_ivf points into
        ivf.merge_from(faiss.extract_index_ivf(held), 0)
    index.ntotal = ivf.ntotal  # a wrapper (OPQ's rotation) counts what its IVF holds
    return index


# The finishing steps return (vectors in the index, its tuning).
def finish_single(plan: Plan, parts: list[int], truth: ann.Truth, target: float, k: int, timed: int) -> tuple:
    index = _merged(plan, parts)
    faults.point("index.merge")  # merged, index.faiss not yet written
    catalog.write_index(layout.index_file(plan.folder), index)
    return index.ntotal, ann.tune(index, truth, target, k, timed)


def finish_ondisk(
    plan: Plan, parts: list[int], truth: ann.Truth, target: float, k: int, timed: int, base: Location | None = None
) -> tuple:
    """The parts merged on disk (after the lists of `base`, the folder of a build merged on disk before
    on the same quantizer, when an incremental build extends it)."""
    trained = catalog.read_index(layout.trained_file(plan.folder))
    files = [layout.part_file(plan.folder, part) for part in parts]
    index_file, data_file = layout.index_file(plan.folder), layout.index_data_file(plan.folder)
    before = None if base is None else (layout.index_file(base), layout.index_data_file(base))
    with catalog.merged_on_disk(trained, files, index_file, data_file, before) as index:
        faults.point("index.merge")  # merged and uploaded, build.json not yet written
        return index.ntotal, ann.tune(index, truth, target, k, timed)


def finish_shard(plan: Plan, shard: int, parts: list[int], onto: Location | None = None) -> None:
    """Shard `shard`: the parts merged (onto a base build's shard file `onto`, when an incremental build
    grows its last shard)."""
    catalog.write_index(layout.shard_file(plan.folder, shard), _merged(plan, parts, onto))
    faults.point("index.merge")  # a shard written, build.json not yet


def tune_shards(
    plan: Plan, parts: list[int], truth: ann.Truth, target: float, k: int, timed: int, shards: int = 0
) -> tuple:
    """Recall of the shards searched together: shards on one quantizer probe the same lists, so their
    merged top-k is the top-k of the parts merged into one index, which this task tunes. `shards`:
    shard files already in the folder (an incremental build's base shards) merged first."""
    import faiss

    index = _merged(plan, parts) if not shards else catalog.read_index(layout.trained_file(plan.folder))
    if shards:
        ivf = faiss.extract_index_ivf(index)
        for shard in range(shards):
            held = catalog.read_index(layout.shard_file(plan.folder, shard))
            ivf.merge_from(faiss.extract_index_ivf(held), 0)
        index.ntotal = ivf.ntotal
    return index.ntotal, ann.tune(index, truth, target, k, timed)


def copy_file(source: Location, target: Location) -> None:
    """One file copied whole, streamed (a base build's shard or quantizer into a new build's folder)."""
    with storage.open_input(source) as f, storage.open_output(target) as out:
        while chunk := f.read(COPY_CHUNK):
            out.write(chunk)


# Running the steps.
def part_ranges(count: int, part_vectors: int, index_type: str, shards: int = 1) -> list[tuple[int, int]]:
    """(first, count) of each part: contiguous faiss_id ranges of at most `part_vectors`, and at most
    count / shards so that each of the shards gets a part; one part for a type that cannot merge."""
    size = min(part_vectors, math.ceil(count / shards)) if ann.mergeable(index_type) else count
    size = max(size, 1)
    return [(first, min(size, count - first)) for first in range(0, max(count, 1), size)]


def shard_groups(parts: int, shards: int) -> list[list[int]]:
    """Contiguous groups of parts, one per shard (as even as whole parts allow)."""
    if shards > parts:  # part_ranges makes `shards` parts of any index with that many vectors
        raise UserError(f"--shards {shards} needs at least {shards} vectors; lower --shards")
    bounds = [round(s * parts / shards) for s in range(shards + 1)]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(shards)]


class TaskFailedError(UserError):
    """A step's Ray task crashed (a bug or a lost worker, not a refusal): one line and exit status 1,
    not Ray's traceback. The build publishes nothing, as when it fails in this process."""

    def __init__(self, step: str, error: BaseException):
        first = (str(error).strip().splitlines() or [""])[0]
        super().__init__(f"the build's {step} task failed: {type(error).__name__}: {first}", exit_code=1)


class Runner:
    """Runs steps as Ray tasks (`remote`) or inline, in submission order either way; `nodes` collects
    the Ray nodes the tasks ran on, `peaks` each step's tasks' peak RSS in MiB."""

    def __init__(self, remote: bool) -> None:
        self.remote = remote
        self.where = "ray" if remote else "local"
        self.nodes: set[str] = set()
        self.peaks: dict[str, list[int]] = {}
        if remote:
            cluster.start()

    def share(self, value: object) -> object:
        """`value` as an argument of many calls: put once into Ray's object store (each task reads
        that one copy) instead of serialised into every task."""
        if not self.remote:
            return value
        import ray

        return ray.put(value)

    def run(self, calls: list[tuple], memory: int, progress: Progress | None = None) -> list:
        """[(function, *args)] → their results, in order; each task declares `memory` bytes.
        progress(done, total) counts the calls finished."""
        if not self.remote:
            results = []
            for function, *args in calls:
                results.append(function(*args))
                if progress:
                    progress(len(results), len(calls))
            return results
        import ray

        declared = int(min(max(memory * SLACK, MIN_TASK_MEMORY), _largest_node_memory()))
        # max_retries=0: a step killed half-way fails the build (nothing is published) instead of
        # being run again on top of what it left. max_calls=1: a fresh worker per task, which hands
        # its memory back when done and whose peak RSS is that task's own.
        task = ray.remote(max_calls=1)(_on_node).options(memory=declared, max_retries=0)
        refs = [task.remote(function, *args) for function, *args in calls]
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            if progress:
                progress(len(refs) - len(pending), len(refs))
        try:
            done = ray.get(refs)
        except ray.exceptions.RayTaskError as failed:
            if isinstance(failed.cause, UserError):  # a user's error raised in a task: its one line
                raise failed.cause from None
            raise TaskFailedError(calls[0][0].__name__, failed.cause or failed) from failed
        except ray.exceptions.RayError as failed:  # the task's worker died (killed, out of memory)
            raise TaskFailedError(calls[0][0].__name__, failed) from failed
        self.nodes |= {node for node, _, _ in done}
        self.peaks.setdefault(calls[0][0].__name__, []).extend(peak for _, peak, _ in done)
        return [result for _, _, result in done]


def _on_node(function, *args) -> tuple[str, int, object]:
    """A step run in a Ray task: the node it ran on, the task's peak RSS in MiB, its result."""
    import resource

    import ray

    result = function(*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # KiB on Linux
    return ray.get_runtime_context().get_node_id(), peak, result


def _largest_node_memory() -> int:
    """The most memory one node offers Ray (a task asking for more would wait forever)."""
    import ray

    return int(max(node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]))


def vector_bytes(count: int, dim: int) -> int:
    return count * dim * 4


def index_memory(index_type: str, count: int, dim: int) -> int:
    """Estimated bytes of an index of this type (flat's size where the estimate does not know it)."""
    try:
        return ann.index_bytes(index_type, count, dim)
    except (AttributeError, ValueError):
        return vector_bytes(count, dim)
