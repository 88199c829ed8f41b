"""Where every layer lives under the data root, and how model_version and dt are spelled.

No other module builds a location under the data root by hand. Locations join like paths whether
the root is a local folder or an object-store prefix (storage.Location); nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from pathlib import Path

from .storage import Location


# bronze
def downloads_dir(root: Location, run_id: str) -> Location:
    return root / "bronze" / "downloads" / run_id


def objects_dir(root: Location) -> Location:
    return root / "bronze" / "objects"


def object_relpath(media_id: str, ext: str) -> str:
    """Content-addressed location of an image, relative to the data root."""
    return f"bronze/objects/{media_id[:2]}/{media_id}.{ext}"


def object_glob(media_id: str) -> str:
    """The pattern, under objects_dir, of a media_id's object whatever its extension."""
    return f"{media_id[:2]}/{media_id}.*"


def manifest_dir(root: Location) -> Location:
    return root / "bronze" / "manifest"


def manifest_part(root: Location, run_id: str, number: int, size: int) -> Location:
    """An ingest run's `number`th manifest object (one per finished shard); its name records its size
    (the part is its own commit, so the name is the only record a reader lists with it)."""
    return manifest_dir(root) / f"part-{run_id}-{number:05d}.{size}B.parquet"


MANIFEST_PARTS = "part-*.*B.parquet"  # under manifest_dir: the parts, each name recording its size


def manifest_part_size(name: str) -> int:
    """The size a manifest part's name records (manifest_part)."""
    return int(re.fullmatch(r"part-.+\.(\d+)B\.parquet", name).group(1))


def ingest_runs_dir(root: Location) -> Location:
    return root / "bronze" / "runs"


def export_runs_dir(root: Location) -> Location:
    """`rayclip export` reads the data root and writes elsewhere: its run records and logs stay here."""
    return root / "exports" / "runs"


# run records (bronze/runs/, silver/runs/): <run_id>.json, and the libraries' output as <run_id>.log
RUN_RECORDS = "*.json"


def run_record(runs_dir: Location, run_id: str) -> Location:
    return runs_dir / f"{run_id}.json"


def run_log(runs_dir: Location, run_id: str) -> Location:
    return runs_dir / f"{run_id}.log"


# silver: three tables, each partitioned by model_version and dt, each committed by run records
EMBEDDINGS = "embeddings"  # media_id, embedding, embedded_at
CAPTIONS = "captions"  # caption_id (caption_id()), caption, embedding, embedded_at: one row per distinct caption
CLIP_SCORES = "clip_scores"  # media_id, caption_id, clip_score, scored_at: one row per (image, caption) pair
SILVER_TABLES = (EMBEDDINGS, CAPTIONS, CLIP_SCORES)


def silver_table_dir(root: Location, table: str = EMBEDDINGS) -> Location:
    return root / "silver" / table


def embeddings_dir(root: Location) -> Location:
    return silver_table_dir(root, EMBEDDINGS)


def silver_partition(root: Location, model_version: str, day: str, table: str = EMBEDDINGS) -> Location:
    return silver_model_dir(root, model_version, table) / f"dt={day}"


def silver_model_dir(root: Location, model_version: str, table: str = EMBEDDINGS) -> Location:
    return silver_table_dir(root, table) / f"model_version={model_version}"


def caption_id(caption: str) -> str:
    """A caption's key in silver: the lowercase hex sha256 of its UTF-8 text (as media_id is of the bytes)."""
    return hashlib.sha256(caption.encode()).hexdigest()


def partition_value(folder_name: str) -> str:
    """What a hive-style folder name says: model_version=<mv> -> <mv>, dt=<day> -> <day>."""
    return folder_name.split("=", 1)[1]


# under embeddings_dir
SILVER_COMMITS = "model_version=*/_commits/*.json"
SILVER_FILES = "model_version=*/dt=*/*.parquet"


def silver_model_file(root: Location, model_version: str) -> Location:
    """Which model made these embeddings ('_' keeps it out of Parquet dataset readers)."""
    return silver_model_dir(root, model_version) / "_model.json"


def silver_commits_dir(root: Location, model_version: str, table: str = EMBEDDINGS) -> Location:
    """One commit record per run ('_' keeps it out of Parquet dataset readers)."""
    return silver_model_dir(root, model_version, table) / "_commits"


def silver_commit_file(root: Location, model_version: str, run_id: str, table: str = EMBEDDINGS) -> Location:
    return silver_commits_dir(root, model_version, table) / f"{run_id}.json"


COMMIT_RECORDS = "*.json"  # under silver_commits_dir
PARTITION_FILES = "*.parquet"  # a silver partition's files, committed or not
IMG2DATASET_SHARD_STATS = "*_stats.json"  # img2dataset writes one when a shard is finished


# Ray Data's Parquet writer names a write task's files <stem>-<i>.parquet (its pyarrow basename_template).
RAY_FILE_SUFFIX = "-{i}.parquet"
RUN_ID = r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}"  # new_run_id's shape


def silver_file_stem(run_id: str, write_uuid: str, task_index: int) -> str:
    """A silver file of a run, less the RAY_FILE_SUFFIX Ray Data's writer adds: the run_id first, so an
    uncommitted file names its run (and Ray asks for its write's uuid in the name)."""
    return f"{run_id}_{write_uuid}_{task_index:06d}"


def silver_file_name(run_id: str, write_uuid: str, task_index: int, i: int = 0) -> str:
    """The whole name of a run's silver file, as Ray Data's writer completes silver_file_stem."""
    return silver_file_stem(run_id, write_uuid, task_index) + RAY_FILE_SUFFIX.format(i=i)


def silver_file_run(name: str) -> str | None:
    """The run_id a silver file's name starts with (silver_file_name), or None for any other name."""
    match = re.fullmatch(rf"({RUN_ID})_[\w-]+" + re.escape(RAY_FILE_SUFFIX).replace(r"\{i\}", r"\d+"), name)
    return match.group(1) if match else None


def silver_work_dir(root: Location, run_id: str) -> Location:
    """Held while an embed run lives (storage.working): its files are not debris until it dies."""
    return root / "silver" / "_work" / run_id


def embed_runs_dir(root: Location) -> Location:
    return root / "silver" / "runs"


def caption_runs_dir(root: Location) -> Location:
    """The caption runs' records and logs (stages/captions.py), apart from the image embed runs'."""
    return root / "silver" / "caption_runs"


# gold: a build folder holds the files below; build.json is written last (the build's commit record)
BUILD_INFO = "build.json"
BUILD_INFOS = f"*/{BUILD_INFO}"  # under builds_dir: one per committed build


def gold_root(root: Location) -> Location:
    return root / "gold"


def gold_dir(root: Location, model_version: str) -> Location:
    return gold_root(root) / model_version


def builds_dir(root: Location, model_version: str) -> Location:
    return gold_dir(root, model_version) / "builds"


def build_dir(root: Location, model_version: str, build_id: str) -> Location:
    return builds_dir(root, model_version) / build_id


def current_file(root: Location, model_version: str) -> Location:
    return gold_dir(root, model_version) / "CURRENT"


def build_info_file(build: Location) -> Location:
    return build / BUILD_INFO


def index_file(build: Location) -> Location:
    return build / "index.faiss"


def index_data_file(build: Location) -> Location:
    """The inverted lists of an index merged on disk (form "ondisk"): index.faiss holds the trained
    quantizer and the lists' offsets, this file the codes and ids; FAISS opens it by name, beside
    index.faiss (IO_FLAG_ONDISK_SAME_DIR)."""
    return build / "index.ivfdata"


def shard_file(build: Location, shard: int) -> Location:
    """Shard `shard` of a build kept in shards (form "shards"): an IVF index on the build's one trained
    quantizer holding a contiguous range of faiss_ids, with their global ids (build.json's `shards`)."""
    return build / f"shard-{shard:05d}.faiss"


def parts_dir(build: Location) -> Location:
    """The working files of a full build's steps (trained.faiss and the parts), inside the build's
    folder while it is built; removed before build.json, so a published build holds none."""
    return build / "parts"


def trained_file(build: Location) -> Location:
    """The trained, empty index the build's add tasks fill (a copy each) and its parts merge onto."""
    return parts_dir(build) / "trained.faiss"


def quantizer_file(build: Location) -> Location:
    """A build kept on disk or in shards keeps trained.faiss (its trained quantizer and codebooks, no
    vectors): an incremental build adds its new rows as new parts onto it."""
    return build / "trained.faiss"


def part_file(build: Location, part: int) -> Location:
    """Part `part` of a full build: trained.faiss filled with one contiguous range of faiss_ids."""
    return parts_dir(build) / f"part-{part:05d}.faiss"


def buckets_dir(build: Location) -> Location:
    """A full build's first step's working files: the silver rows' ids split by a hash of media_id."""
    return parts_dir(build) / "buckets"


def bucket_file(build: Location, group: int, bucket: int) -> Location:
    """Bucket `bucket` of the rows of file group `group`: (media_id, embedded_at, file_idx, row_idx)."""
    return buckets_dir(build) / f"group-{group:05d}-bucket-{bucket:05d}.parquet"


def mapping_part_file(build: Location, part: int) -> Location:
    """The mapping rows of part `part`'s faiss_ids, written by a task; the parts concatenated in order
    are mapping.parquet."""
    return parts_dir(build) / f"mapping-{part:05d}.parquet"


def caption_index_file(build: Location) -> Location:
    """The build's caption index (optional): one vector per distinct caption, its own id space."""
    return build / "captions.faiss"


def caption_mapping_file(build: Location) -> Location:
    """Row i describes caption index row i: its text and the faiss_ids of the images carrying it."""
    return build / "captions.parquet"


def mapping_file(build: Location) -> Location:
    """Row i describes faiss_id i."""
    return build / "mapping.parquet"


def mapping_arrow_file(build: Location) -> Location:
    """mapping.parquet's rows again as an uncompressed Arrow IPC file: the serving copy, which a server
    that maps its index maps too (read zero-copy from the page cache, none of it private memory)."""
    return build / "mapping.arrow"


def caption_mapping_arrow_file(build: Location) -> Location:
    """captions.parquet's rows again as an uncompressed Arrow IPC file, mapped like mapping.arrow."""
    return build / "captions.arrow"


def tuning_file(build: Location) -> Location:
    """Held-out queries and their exact neighbours, which an incremental build measures itself with."""
    return build / "tuning.npz"


def eval_file(build: Location) -> Location:
    return build / "eval.json"


def eval_html_file(build: Location) -> Location:
    return build / "eval.html"


def build_cache(cache_home: Path, root: Location, model_version: str, build_id: str) -> Path:
    """Where this machine keeps its copy of a build of an object-store root (the Searcher's cache):
    keyed by the root's URI, the model_version and the build_id, so two stores never share one."""
    store = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_home / "builds" / store / model_version / build_id


def openvino_cache(cache_home: Path, model_version: str, model_key: str, openvino_version: str) -> Path:
    """Where this machine keeps a model's image tower converted to OpenVINO (--runtime openvino): per
    model_version, the model itself (`model_key`: --save-as may file two models under one name) and
    the OpenVINO release that converted it (its IR is read back only by the same one)."""
    return cache_home / "openvino" / model_version / f"{model_key}-{slug(openvino_version)}"


# debris: what runs killed mid-way leave, as patterns under the data root (debris.py judges them)
DOWNLOAD_FOLDERS = "bronze/downloads/*"  # downloads_dir of every run
SILVER_WORK_FOLDERS = "silver/_work/*"  # silver_work_dir of every run
BUILD_FOLDERS = "gold/*/builds/*"  # build_dir of every build: debris only while build.json is missing
# storage.write_atomic's temporaries, locally: a hidden .<name>.<random>.tmp beside the file
TEMP_FILES = ("bronze/manifest/.*.tmp", "bronze/objects/*/.*.tmp", "bronze/runs/.*.tmp", "silver/**/.*.tmp")
GOLD_TEMP_FILES = ("gold/*/.*.tmp", "gold/*/builds/*/.*.tmp")
STORED_OBJECTS = "*/*"  # under objects_dir


# names
def new_run_id() -> str:
    """Sorts in creation order (microseconds: builds can follow each other within a second);
    the random suffix keeps concurrent runs apart."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


def check_day(day: str) -> str:
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        from ..errors import UserError

        raise UserError(f"--dt {day!r} is not a date; use YYYY-MM-DD") from None
    return day


def slug(name: str) -> str:
    """ViT-B-32 -> vit_b32, laion2b_s34b_b79k -> laion2b_s34b_b79k.

    A number that follows a one-letter token sticks to it, as in the DESIGN's clip_vit_b32_openai.
    """
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    out: list[str] = []
    for token in tokens:
        if out and token.isdigit() and len(out[-1]) == 1:
            out[-1] += token
        else:
            out.append(token)
    return "_".join(out)
