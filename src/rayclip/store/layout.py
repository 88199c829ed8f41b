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


def manifest_part(root: Location, run_id: str) -> Location:
    """The one manifest object an ingest run commits."""
    return manifest_dir(root) / f"part-{run_id}.parquet"


def ingest_runs_dir(root: Location) -> Location:
    return root / "bronze" / "runs"


# silver
def embeddings_dir(root: Location) -> Location:
    return root / "silver" / "embeddings"


def silver_partition(root: Location, model_version: str, day: str) -> Location:
    return silver_model_dir(root, model_version) / f"dt={day}"


def silver_model_dir(root: Location, model_version: str) -> Location:
    return embeddings_dir(root) / f"model_version={model_version}"


def silver_model_file(root: Location, model_version: str) -> Location:
    """Which model made these embeddings ('_' keeps it out of Parquet dataset readers)."""
    return silver_model_dir(root, model_version) / "_model.json"


def silver_commits_dir(root: Location, model_version: str) -> Location:
    """One commit record per run ('_' keeps it out of Parquet dataset readers)."""
    return silver_model_dir(root, model_version) / "_commits"


def silver_commit_file(root: Location, model_version: str, run_id: str) -> Location:
    return silver_commits_dir(root, model_version) / f"{run_id}.json"


def silver_file_stem(run_id: str, write_uuid: str, task_index: int) -> str:
    """A silver file of a run, less the `-<n>.parquet` Ray Data's writer adds: the run_id first, so an
    uncommitted file names its run (and Ray asks for its write's uuid in the name)."""
    return f"{run_id}_{write_uuid}_{task_index:06d}"


def silver_file_run(name: str) -> str | None:
    """The run_id a silver file's name starts with (silver_file_stem), or None for any other name."""
    match = re.fullmatch(r"(\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6})_[\w-]+\.parquet", name)
    return match.group(1) if match else None


def silver_work_dir(root: Location, run_id: str) -> Location:
    """Held while an embed run lives (storage.working): its files are not debris until it dies."""
    return root / "silver" / "_work" / run_id


def embed_runs_dir(root: Location) -> Location:
    return root / "silver" / "runs"


# gold: a build folder holds the files below; build.json is written last (the build's commit record)
BUILD_INFO = "build.json"


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


def mapping_file(build: Location) -> Location:
    """Row i describes faiss_id i."""
    return build / "mapping.parquet"


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
