"""Where every layer lives under the data root, and how model_version and dt are spelled.

No other module builds a path under the data root by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import tempfile
from pathlib import Path

DATA_DIR_ENV = "RAYCLIP_DATA_DIR"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `$RAYCLIP_DATA_DIR`, else `./data`."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").absolute()


# bronze
def downloads_dir(root: Path, run_id: str) -> Path:
    return root / "bronze" / "downloads" / run_id


def objects_dir(root: Path) -> Path:
    return root / "bronze" / "objects"


def object_relpath(media_id: str, ext: str) -> str:
    """Content-addressed location of an image, relative to the data root."""
    return f"bronze/objects/{media_id[:2]}/{media_id}.{ext}"


def manifest_dir(root: Path) -> Path:
    return root / "bronze" / "manifest"


def ingest_runs_dir(root: Path) -> Path:
    return root / "bronze" / "runs"


# silver
def embeddings_dir(root: Path) -> Path:
    return root / "silver" / "embeddings"


def silver_partition(root: Path, model_version: str, day: str) -> Path:
    return silver_model_dir(root, model_version) / f"dt={day}"


def silver_model_dir(root: Path, model_version: str) -> Path:
    return embeddings_dir(root) / f"model_version={model_version}"


def silver_model_file(root: Path, model_version: str) -> Path:
    """Which model made these embeddings ('_' keeps it out of Parquet dataset readers)."""
    return silver_model_dir(root, model_version) / "_model.json"


def silver_files(root: Path, model_version: str, day: str | None = None) -> list[Path]:
    """The committed silver Parquet files of a model_version (one dt partition, or all)."""
    pattern = f"dt={check_day(day)}/*.parquet" if day else "dt=*/*.parquet"
    return sorted(silver_model_dir(root, model_version).glob(pattern))


def silver_model_versions(root: Path) -> list[str]:
    return sorted(p.name.split("=", 1)[1] for p in embeddings_dir(root).glob("model_version=*") if p.is_dir())


def silver_staging(root: Path, run_id: str) -> Path:
    # Outside silver/embeddings so that no reader of the dataset ever sees staged files.
    return root / "silver" / "_staging" / run_id


def embed_runs_dir(root: Path) -> Path:
    return root / "silver" / "runs"


# gold
def gold_dir(root: Path, model_version: str) -> Path:
    return root / "gold" / model_version


def builds_dir(root: Path, model_version: str) -> Path:
    return gold_dir(root, model_version) / "builds"


def build_dir(root: Path, model_version: str, build_id: str) -> Path:
    return builds_dir(root, model_version) / build_id


def current_file(root: Path, model_version: str) -> Path:
    return gold_dir(root, model_version) / "CURRENT"


def gold_model_versions(root: Path) -> list[str]:
    gold = root / "gold"
    if not gold.is_dir():
        return []
    return sorted(p.name for p in gold.iterdir() if (p / "CURRENT").is_file())


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
        from .errors import UserError

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


# atomic writes
def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary name in the same folder, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def temp_path_for(path: Path) -> Path:
    """A hidden sibling name for writers (parquet, faiss) that need a path rather than bytes."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
