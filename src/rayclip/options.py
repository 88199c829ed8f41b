"""Every option of every stage and query, each default written once.

One frozen dataclass per stage (ingest, embed, index, eval, demo, train) and per query side
(search, serve). The library functions take their defaults from these classes; `rayclip.cli`
generates its parser from them (flag, help, choices), so a flag cannot drift from the library.

A field's metadata says how it appears on the command line:
  help     the flag's help text (the parser appends the default unless the text names it)
  flags    extra spellings shown beside the flag (the seed's, e.g. --batch_size)
  cli      False: library only (not a flag)
  choices  the values allowed
  nargs    "+" for a list, "?" for an optional value (with `const`); `metavar` names the value
  action   "append": repeatable, each use adds one value
  positive True: a positive integer

A flag name means one thing across commands: a field of the same name in two classes must have
the same type, default and help (tests/unit/test_options.py holds every class and command to that; the
one listed exception is --seed, the synthetic set's seed, whose default is each command's own).
Library functions take their defaults from here: `batch_size: int = EmbedOptions.batch_size`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field

# The facts more than one class refers to, written here once.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("auto", "actor", "tasks", "gpu")
RUNTIMES = ("torch", "openvino")  # what runs the image tower in an embed run
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
DEFAULT_COLLAPSE = 0.96  # cosine at or above which a lower-ranked result is a near-duplicate
COLLAPSE_RANGE = (-1, 1)  # a collapse threshold is a cosine
DEFAULT_MAX_INDEX_MEMORY = "4G"
DEFAULT_TARGET_RECALL = 0.95
DISTRIBUTORS = ("multiprocessing", "ray")
PARALLEL = ("auto", "ray", "local")  # where an index build's train, add and finish steps run
SEARCH_OVER = ("images", "captions")  # what a query searches: a build's image index or its caption index
EXPORT_FORMATS = ("webdataset", "parquet", "folder")
INDEX_TYPES_HELP = "auto (flat, HNSW or IVF by the count and --max-index-memory), flat, or a FAISS factory string"
PRECISION_HELP = (
    "compute precision; vectors are stored as float32 either way "
    "(auto: bf16 where the CPU has AMX or AVX-512 BF16 or the GPU runs it, else fp32)"
)
# Flags that more than one command has: one help each, written here.
LIMIT_HELP = "at most N: rows of the metadata or files of the folder (ingest), new media_ids (embed)"
DT_HELP = "silver partition YYYY-MM-DD: embed writes into it (default: today, UTC), index reads only it (default: all)"
MODEL_VERSION_HELP = "which embeddings or index (default: the only one present)"
MAX_INDEX_MEMORY_HELP = (
    "memory budget of an index: `index` picks a type that fits it (auto), `serve` maps a larger one "
    "from disk instead of reading it into RAM"
)
SEED_HELP = "seed of the synthetic images (train-reference trains on 0; the demo's are from a seed training never saw)"


def _opt(default, help: str, **meta):  # noqa: A002 - the flag's help
    """A field with its default and how it shows on the command line. The default is a plain class
    attribute (a tuple, never a list), so a signature can say `k: int = SearchOptions.k`."""
    return field(default=tuple(default) if isinstance(default, list) else default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Which CLIP model: an open_clip name and pretrained tag, a checkpoint, or the reference model."""

    model: str | None = _opt(None, f"open_clip model name or hf-hub: id (default: {DEFAULT_MODEL})")
    pretrained: str | None = _opt(
        None,
        f"pretrained tag (default: {DEFAULT_PRETRAINED}), a checkpoint path, `none` (random init) or `reference`",
    )
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """img2dataset's knobs and what to read."""

    url_col: str | None = _opt(None, "URL column (default: URL, else url)")
    caption_col: str | None = _opt(None, "caption column (default: TEXT, else caption/text)")
    limit: int | None = _opt(None, LIMIT_HELP, positive=True)
    processes: int = _opt(1, "img2dataset processes", positive=True)
    threads: int = _opt(16, "img2dataset threads per process", positive=True)
    timeout: int = _opt(10, "seconds per download", positive=True)
    retries: int = _opt(0, "retries per URL")
    refetch: bool = _opt(False, "fetch URLs the manifest already holds again (re-check)")
    distributor: str = _opt(
        "multiprocessing",
        "img2dataset's distributor: multiprocessing (--processes here) or ray (a task per shard on the "
        "cluster ray.init() joins: $RAY_ADDRESS, else a local one)",
        choices=DISTRIBUTORS,
    )


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """The Ray Data job: actor pool, batches, partitioning, precision, runtime."""

    actors: int | None = _opt(
        None,
        "actors in the pool, one model each (default: one per GPU asked for, else one per two CPUs)",
        positive=True,
    )
    batch_size: int = _opt(32, "images per batch", positive=True, flags=("--batch_size",))
    limit: int | None = _opt(None, LIMIT_HELP, positive=True)
    dt: str | None = _opt(None, DT_HELP)
    blocks: int | None = _opt(None, "override_num_blocks (default: actors x 8)", positive=True)
    force: bool = _opt(False, "re-embed media_ids already in silver")
    gpus_per_actor: float = _opt(0.0, "GPUs per actor on a cluster (0: CPU)")
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)
    decode: str = _opt(
        "auto",
        "where images are decoded: actor (inside it, overlapped with the encode), tasks (Ray Data CPU tasks "
        "feeding the actors uint8 pixels), gpu (JPEGs on the actors' GPUs); auto: tasks with GPUs, else actor",
        choices=DECODES,
    )
    runtime: str = _opt(
        "torch",
        "what runs the image tower: torch, or openvino (CPU only: the tower converted once per model_version "
        "and cached on this machine; needs pip install 'rayclip[openvino]'); the text tower is torch's either way",
        choices=RUNTIMES,
    )
    # embed files its vectors under a name; every other command *selects* by --model-version
    save_as: str | None = _opt(None, "file the embeddings under this model_version instead of the model's own")
    no_captions: bool = _opt(False, "embed images only: no caption vectors and no clip_score")


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    """Which silver to index and how."""

    model_version: str | None = _opt(None, MODEL_VERSION_HELP)
    dt: str | None = _opt(None, DT_HELP)
    index_type: str = _opt("auto", INDEX_TYPES_HELP)
    max_index_memory: str = _opt(DEFAULT_MAX_INDEX_MEMORY, MAX_INDEX_MEMORY_HELP)
    target_recall: float = _opt(DEFAULT_TARGET_RECALL, "recall@10 vs exact search the build tunes for")
    retrain: bool = _opt(False, "full build: do not extend the CURRENT index")
    parallel: str = _opt(
        "auto",
        "where the build's steps run: Ray tasks (joining $RAY_ADDRESS, else a local cluster) or this process "
        "(auto: Ray when $RAY_ADDRESS is set or the build has more than one part)",
        choices=PARALLEL,
    )
    part_vectors: int = _opt(
        4_000_000,
        "most vectors one add task indexes (one part of the build); with --shards K, at most 1/K of them",
        positive=True,
    )
    shards: int = _opt(1, "keep the index as K shards, one per server, instead of one file", positive=True)
    on_disk: bool = _opt(False, "merge the index on disk (index.ivfdata, memory-mapped when served), not in RAM")


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """One query's knobs (CLI, Python API, /api/* and clip-retrieval's routes alike)."""

    k: int = _opt(10, "results to return")
    where: str | None = _opt(None, "filter, e.g. \"width >= 512 AND caption LIKE '%dog%'\"")
    collapse: float | None = _opt(
        None,
        f"fold near-duplicates (cosine >= COSINE, default {DEFAULT_COLLAPSE}) into the result above them",
        nargs="?",
        const=DEFAULT_COLLAPSE,
        metavar="COSINE",
    )
    model_version: str | None = _opt(None, MODEL_VERSION_HELP)
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)
    over: str = _opt(
        "images",
        "search the image index, or the caption index (results: the images carrying each caption found)",
        choices=SEARCH_OVER,
    )


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """A subset out, as img2dataset writes its datasets (the query's k, where and model_version are SearchOptions')."""

    format: str = _opt(
        "webdataset", "what to write: webdataset tars, parquet files or a folder of files", choices=EXPORT_FORMATS
    )
    samples_per_shard: int = _opt(
        10_000, "samples per tar, parquet file or folder, as img2dataset's number_sample_per_shard", positive=True
    )
    min_score: float | None = _opt(
        None, "with a query: every result with at least this cosine (instead of the top --k)", metavar="COSINE"
    )


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The HTTP service."""

    host: str = _opt("127.0.0.1", "bind address (default: loopback only)")
    port: int = _opt(8000, "port")
    model_version: str | None = _opt(None, MODEL_VERSION_HELP)
    max_upload_mb: int = _opt(10, "largest image upload accepted, in MiB", positive=True)
    cors_origin: tuple[str, ...] = _opt(
        (),
        "an origin allowed to call the API from a browser, e.g. a clip-retrieval front (repeatable; `*` for any)",
        action="append",
    )
    allow_url_queries: bool = _opt(False, "let /knn-service fetch image_url (public http(s) only)")
    serve_images: bool = _opt(False, "/knn-service urls point at our stored copies")
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)
    api_key: str | None = _opt(None, "require Authorization: Bearer KEY on /api/* (or $RAYCLIP_API_KEY)")
    allow_anonymous: bool = _opt(False, "serve a non-loopback address without an API key")
    queue_depth: int = _opt(8, "queries encoding at once; more get 503 + Retry-After", positive=True)
    mmap: bool = _opt(False, "map the image index from disk (FAISS IO_FLAG_MMAP) instead of reading it into RAM")
    max_index_memory: str = _opt(DEFAULT_MAX_INDEX_MEMORY, MAX_INDEX_MEMORY_HELP)
    ray: bool = _opt(
        False,
        "serve through Ray Serve: one deployment per shard of the build, each mapping its shard, behind "
        "this app as the ingress (a cluster at $RAY_ADDRESS, else a local one)",
    )
    replicas: int = _opt(1, "--ray: replicas of each shard's deployment", positive=True)
    deploy_timeout: float = _opt(300.0, "--ray: seconds for every Serve application to run (replicas placed)")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit as the service takes it, in bytes (the flag says MiB): the one conversion."""
        return self.max_upload_mb << 20


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Recall@K through the whole pipeline."""

    recall_at: tuple[int, ...] = _opt((1, 5, 10), "recall cut-offs", nargs="+", positive=True)
    annotations: str | None = _opt(None, "Karpathy split JSON (dataset_flickr30k.json) or COCO captions JSON")
    images_dir: str | None = _opt(None, "the folder the annotation file's image names are under")
    split: str | None = _opt(None, "Karpathy split to evaluate (default: test)")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """The offline demo."""

    images: int = _opt(500, "synthetic images to generate", positive=True)
    seed: int = _opt(1234, SEED_HELP)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Retraining the shipped reference model."""

    out: str | None = _opt(None, "where to write the weights (default: the packaged file)")
    steps: int = _opt(700, "training steps", positive=True)
    seed: int = _opt(0, SEED_HELP)


def fields_of(spec: str) -> dict[str, tuple[dataclasses.Field, object]]:
    """A command's options by name: (field, its type). `spec` names the classes by their stem, each whole
    ("Embed") or some of its fields ("Embed:actors,batch_size"); a field two of them share is one flag."""
    fields: dict[str, tuple[dataclasses.Field, object]] = {}
    for kind, _, names in (entry.partition(":") for entry in spec.split()):
        cls, chosen = globals()[f"{kind}Options"], names.split(",") if names else None
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (chosen is None or f.name in chosen) and f.metadata.get("cli", True) and f.name not in fields:
                fields[f.name] = (f, hints[f.name])
    return fields


def add_flags(parser: argparse.ArgumentParser, spec: str) -> list[str]:
    """Every option `spec` names (see fields_of) as a flag of this parser; returns their names."""
    fields = fields_of(spec)
    for f, hint in fields.values():
        add_flag(parser, f, hint)
    return list(fields)


def _positive_int(text: str) -> int:
    if int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, hint) -> None:
    """The flag of one option: --field-name, its help with the default appended, type, choices and spellings."""
    meta, default = f.metadata, f.default
    kwargs: dict = {"dest": f.name, "default": list(default) if isinstance(default, tuple) else default}
    if hint is bool:
        kwargs["action"] = "store_true"
    else:  # int | None -> int, tuple[int, ...] -> int
        kind = next((a for a in typing.get_args(hint) if a not in (type(None), Ellipsis)), hint)
        kwargs["type"] = _positive_int if meta.get("positive") else kind
        kwargs |= {key: meta[key] for key in ("choices", "nargs", "const", "metavar", "action") if key in meta}
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    shown = None if hint is bool or default == () or "default" in meta["help"] else shown  # nothing to show
    tail = "" if shown is None else f" (default: {shown})"
    kwargs["help"] = (meta["help"] + tail).replace("%", "%%")
    parser.add_argument("--" + f.name.replace("_", "-"), *meta.get("flags", ()), **kwargs)
