"""gold, read: build records (build.json), the builds of a model_version, CURRENT, and the choice
of a model_version."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import PurePosixPath

from ...errors import NoIndexError, UnknownModelVersionError
from .. import layout, storage
from ..storage import Location, ShortReadError
from .committed import remember


@dataclasses.dataclass
class BuildInfo:
    """build.json: what a gold build holds and how it was made. Written last, it is the build's commit
    record. Fields added after the first builds are optional, so every build ever written still reads."""

    build_id: str
    model_version: str
    model: dict  # ModelSpec.to_dict() of the model that made the vectors
    dim: int
    metric: str
    index_type: str
    count: int
    duplicates_dropped: int
    created_at: str
    source_partitions: list[str]
    source_files: int
    index_type_asked: str | None = None
    auto_rejected: dict | None = None  # {"index_type", "recall_at_10"}: auto's first pick, when it missed the target
    silver_files: list[str] | None = None  # None: built before incremental builds
    base_build: str | None = None
    incremental: dict | None = None  # {"added", "replaced"} when the build extended base_build
    full_build_reason: str | None = None
    search_params: dict = dataclasses.field(default_factory=dict)
    recall: dict = dataclasses.field(default_factory=dict)
    query_ms: dict = dataclasses.field(default_factory=dict)
    index_bytes: int | None = None
    file_bytes: dict | None = None  # name -> bytes of each file of the build; None: built before sizes
    captions: dict | None = None  # {"count", "index_type"} of the caption index; None: the build has none
    # How the image index is kept: "single" (index.faiss, read into RAM or mapped), "ondisk" (index.faiss
    # + index.ivfdata, merged on disk), "shards" (shard-NNNNN.faiss, one per `shards` entry).
    form: str = "single"
    shards: list[dict] | None = None  # form "shards": [{"file", "first", "count"}], faiss_ids first..first+count-1
    # How a full build ran: {"parts", "part_vectors" (its largest part's), "ran_on": "ray" | "local", "nodes",
    # "task_peak_rss_mib": {step: [MiB per task]}, "auto": why auto took a family that merges (None: it did not
    # have to)}; None: an incremental build or one from before parts.
    steps: dict | None = None
    timings: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def recall_at_10(self) -> float | None:
        """What the build measured; 1.0 for exact search (it records `exact` instead); None for a
        build from before measured recall."""
        return 1.0 if self.recall.get("exact") else self.recall.get("recall_at_10")

    @classmethod
    def from_dict(cls, written: dict) -> BuildInfo:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in written.items() if k not in known}
        return cls(**{k: v for k, v in written.items() if k in known}, extra=extra)

    def to_dict(self) -> dict:
        written = dataclasses.asdict(self)
        extra = written.pop("extra")
        return written | extra

    @classmethod
    def read(cls, loc: Location) -> BuildInfo:
        """build.json at `loc`; the sizes it records are checked by every later read of the files
        beside it (the build folder, or a local copy of it)."""
        try:
            info = cls.from_dict(storage.read_json(loc))
        except ValueError as exc:  # an empty or cut build.json (JSONDecodeError)
            raise ShortReadError(f"{storage.uri(loc)} is not a whole build record: {exc}") from None
        for name, size in (info.file_bytes or {}).items():
            remember(loc.parent / name, size)
        return info

    def write(self, loc: Location) -> None:
        storage.write_json_atomic(loc, self.to_dict())


def index_files(info: BuildInfo) -> list[Callable[[Location], Location]]:
    """The layout functions of the files a build's image index is read from."""
    if info.form == "shards":
        return [lambda folder, k=k: layout.shard_file(folder, k) for k in range(len(info.shards or []))]
    return [layout.index_file] + ([layout.index_data_file] if info.form == "ondisk" else [])


def index_bytes(info: BuildInfo) -> int:
    """The bytes of a build's image index files: what reading it into RAM would hold."""
    recorded = info.file_bytes or {}
    names = [file_of(PurePosixPath()).name for file_of in index_files(info)]
    return sum(recorded.get(name, 0) for name in names) or (info.index_bytes or 0)


def gold_model_versions(root: Location, published: bool = True) -> list[str]:
    """Model versions with a published index (a CURRENT); all that have a gold folder if not `published`."""
    folders = [f for f in storage.children(layout.gold_root(root)) if storage.is_dir(f)]
    return sorted(f.name for f in folders if not published or storage.exists(layout.current_file(root, f.name)))


def builds(root: Location, model_version: str) -> list[str]:
    """Committed builds (build.json written) of a model_version, oldest first (build ids sort in time order)."""
    found = storage.glob(layout.builds_dir(root, model_version), layout.BUILD_INFOS)
    return sorted(f.parent.name for f in found if not f.parent.name.startswith("."))


def build_info(root: Location, model_version: str, build_id: str) -> BuildInfo:
    return BuildInfo.read(layout.build_info_file(layout.build_dir(root, model_version, build_id)))


def current_build(root: Location, model_version: str) -> str | None:
    """The build CURRENT names (None: nothing published). CURRENT is written whole in one PUT or
    rename, so an empty read is the store's failure, refused rather than taken for a build id."""
    current = layout.current_file(root, model_version)
    if not storage.exists(current):
        return None
    build_id = storage.read_text(current).strip()
    if not build_id:
        raise ShortReadError(f"{storage.uri(current)} read back empty; it always names a build")
    return build_id


def pick_model_version(root: Location, asked: str | None, available: list[str], layer: str) -> str:
    """The asked model_version, or the only one present; else NoIndexError (none present) or
    UnknownModelVersionError (the asked one absent, or several and none asked), naming those present."""
    if not available:
        hint = "run `rayclip embed`" if layer == "embeddings" else "run `rayclip index`"
        raise NoIndexError(f"no {layer} yet under {root}; {hint}")
    if asked in available or (not asked and len(available) == 1):
        return asked or available[0]
    raise UnknownModelVersionError(layer, asked, available)


def pick_indexed(root: Location, asked: str | None) -> str:
    """pick_model_version among the model_versions with a published index."""
    return pick_model_version(root, asked, gold_model_versions(root), "index")
