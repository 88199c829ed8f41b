"""Naming a model: --model/--pretrained as a user wrote them turned into a ModelSpec (and its
model_version), checked against what open_clip knows and what can be loaded here."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from ..options import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..store.layout import slug

REFERENCE_MODEL = "RayCLIP-Ref"
REFERENCE_ALIAS = "reference"
RANDOM_INIT = "none"
PACKAGE_DIR = Path(__file__).parents[1]  # rayclip/: the configs and the reference weights ship there
CONFIG_DIR = PACKAGE_DIR / "model_configs"
REFERENCE_WEIGHTS = PACKAGE_DIR / "weights" / "rayclip-ref.pt"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to load, and the stable model_version name its embeddings are filed under."""

    name: str
    pretrained: str  # a tag, "none", "reference", or a checkpoint path
    checkpoint: str | None = None  # resolved file for reference / local checkpoints
    checkpoint_sha256: str | None = None
    version: str | None = None  # --model-version: an explicit name wins over the derived one
    precision: str | None = None  # what the vectors were computed at (fp32, bf16, fp16), once known

    @property
    def model_version(self) -> str:
        if self.version:
            return self.version
        if self.checkpoint_sha256 and self.pretrained != REFERENCE_ALIAS:
            return f"clip_{slug(self.name)}_ckpt_{self.checkpoint_sha256[:10]}"
        if self.name.startswith("hf-hub:"):
            return f"clip_{slug(self.name)}"
        return f"clip_{slug(self.name)}_{slug(self.pretrained)}"

    def to_dict(self) -> dict:
        """The JSON form (silver `_model.json`, build.json's `model`): every field and the model_version."""
        return dataclasses.asdict(self) | {"model_version": self.model_version}

    @classmethod
    def from_dict(cls, recorded: dict) -> ModelSpec:
        """Back from to_dict()'s form, or an older one: fields it lacks (precision came later) take
        their defaults, keys it does not know are ignored, and a recorded model_version that the
        fields alone would not derive (one named without `version`) is kept as the version."""
        missing = [key for key in ("name", "pretrained") if not recorded.get(key)]
        if missing:
            raise UserError(f"a recorded model lacks {' and '.join(missing)}: {recorded}")
        fields = {field.name for field in dataclasses.fields(cls)}
        spec = cls(**{key: value for key, value in recorded.items() if key in fields})
        named = recorded.get("model_version")
        return dataclasses.replace(spec, version=named) if named and named != spec.model_version else spec


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_model_libraries(model: str) -> None:
    """Import what building `model` needs (torch, open_clip), so a caller can time it apart from the
    build. open_clip imports timm, and timm wandb, for timm image towers alone: the first import for
    a model without one leaves them out (0.8 s of CPU off every process that loads a model: each
    embed actor, each command), and a later model with a timm tower brings timm in then."""
    timm_tower = has_timm_tower(model)
    if not timm_tower and not {"open_clip", "timm"} & sys.modules.keys():
        sys.modules["timm"] = None  # `import timm` fails: open_clip takes timm as not installed
        try:
            import open_clip  # noqa: F401 - imported for its cost
        finally:
            del sys.modules["timm"]
    import open_clip  # noqa: F811

    if timm_tower and open_clip.timm_model.timm is None:  # imported without timm before (or not installed)
        open_clip.model.TimmModel = importlib.reload(open_clip.timm_model).TimmModel  # the class models are built of
    register_configs()


@functools.cache  # asked on every model load (the names' check, the build, an actor's parts)
def has_timm_tower(model: str) -> bool:
    """Whether `model`'s image tower is timm's, from its config file (rayclip's or open_clip's own),
    read without importing open_clip; a model with no config file here (hf-hub:) may have one."""
    open_clip_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    for folder in (CONFIG_DIR, Path(open_clip_dir) / "model_configs"):
        config = folder / f"{model}.json"
        if config.is_file():
            return "timm_model_name" in json.loads(config.read_text()).get("vision_cfg", {})
    return True


@functools.cache
def register_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def resolve(model: str | None = None, pretrained: str | None = None) -> ModelSpec:
    """Turn --model/--pretrained as a user wrote them into a spec; fails fast on bad names."""
    spec = named(model, pretrained)
    check_names(spec)
    return spec


def named(model: str | None = None, pretrained: str | None = None) -> ModelSpec:
    """The spec --model/--pretrained name, without asking open_clip whether it knows the names (which
    imports torch): what a command that may have nothing to do needs for its model_version. The
    reference model and checkpoint files are checked here; check_names does the rest."""
    pretrained = pretrained or (REFERENCE_ALIAS if model == REFERENCE_MODEL else DEFAULT_PRETRAINED)
    if pretrained == REFERENCE_ALIAS:
        if model not in (None, REFERENCE_MODEL):
            raise UserError(f"--pretrained reference is the {REFERENCE_MODEL} model; drop --model {model}")
        if not REFERENCE_WEIGHTS.is_file():
            raise UserError(f"reference weights missing at {REFERENCE_WEIGHTS}; run `rayclip train-reference`")
        return ModelSpec(REFERENCE_MODEL, REFERENCE_ALIAS, str(REFERENCE_WEIGHTS), _file_sha256(REFERENCE_WEIGHTS))
    model = model or DEFAULT_MODEL
    if pretrained.lower() == RANDOM_INIT or model.startswith("hf-hub:"):
        return ModelSpec(model, pretrained.lower() if not model.startswith("hf-hub:") else "hf-hub")
    path = Path(pretrained).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise UserError(f"checkpoint file not found: {path}")
        return ModelSpec(model, str(path.absolute()), str(path.absolute()), _file_sha256(path))
    return ModelSpec(model, pretrained)


def check_names(spec: ModelSpec) -> None:
    """A model open_clip (or rayclip's configs) knows, and a pretrained tag it knows for that model."""
    import_model_libraries(spec.name)
    import open_clip

    if spec.name.startswith("hf-hub:"):
        return
    if spec.name not in open_clip.list_models():
        raise UserError(
            f"unknown model {spec.name!r}; `python -c 'import open_clip; print(open_clip.list_models())'` lists them"
        )
    tag = spec.pretrained
    if spec.checkpoint or tag in (RANDOM_INIT, REFERENCE_ALIAS):
        return
    if tag not in open_clip.list_pretrained_tags_by_model(spec.name):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.name)) or "none"
        raise UserError(f"unknown pretrained tag {tag!r} for {spec.name}; known: {tags}, or a checkpoint path, or none")


def _hub_weights_cached(model: str, tag: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    hub = get_pretrained_cfg(model, tag).get("hf_hub", "")
    if not hub:
        return False
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_available(spec: ModelSpec) -> None:
    """Offline and not cached: say so at once instead of after a minute of retries."""
    if spec.checkpoint or spec.pretrained == RANDOM_INIT:
        return
    cached = spec.pretrained != "hf-hub" and _hub_weights_cached(spec.name, spec.pretrained)
    if not cached and not _hub_reachable():
        what = spec.name if spec.pretrained == "hf-hub" else f"{spec.name}/{spec.pretrained}"
        raise UserError(
            f"weights for {what} are not cached and cannot be downloaded here; "
            "pass --pretrained PATH to a local checkpoint, or --pretrained reference for the offline reference model"
        )
