"""The image tower on OpenVINO (`rayclip embed --runtime openvino`, an optional extra).

The driver converts a model's image tower once (`image_tower`: traced in fp32 with torch.jit,
converted with a dynamic batch so a run's last, smaller batch fits) and keeps the IR in this
machine's cache per model_version; the IR travels to the actors as bytes inside the run's model
parts (ModelParts.image_tower), so an actor on another node never needs the cache. Each actor
compiles it (`compiled`) at the run's precision and thread count. The text tower stays torch's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import sys
import warnings

import numpy as np

from ..errors import UserError
from ..store import layout, storage
from .names import ModelSpec

MISSING = "--runtime openvino needs OpenVINO: pip install 'rayclip[openvino]'"
IR_FILES = ("model.bin", "model.xml")  # the weights first: a cache entry counts once its .xml is there
# The run's precision as OpenVINO's inference precision hint (the IR itself stays fp32).
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
TRACE_BATCH = 2  # the example batch traced; the converted input's batch dimension is dynamic


@dataclasses.dataclass
class ImageTower:
    """A converted image tower as plain data (OpenVINO IR): the model's graph and its weights."""

    xml: bytes
    weights: bytes


def import_openvino():
    """OpenVINO, or the one line saying how to install it. Its converter sends usage reports unless
    openvino_telemetry is missing, and then uses its own stub: rayclip never lets it load."""
    sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: its import fails
    try:
        import openvino
    except ImportError:
        raise UserError(MISSING) from None
    return openvino


def image_tower(spec: ModelSpec) -> tuple[ImageTower, bool]:
    """The model's image tower as OpenVINO IR, and whether it came from this machine's cache (else it
    was converted now, from the model loaded at fp32, and cached)."""
    import_openvino()
    folder = layout.openvino_cache(
        storage.cache_home(), spec.model_version, _model_key(spec), importlib.metadata.version("openvino")
    )
    weights, xml = (folder / name for name in IR_FILES)
    if storage.exists(xml) and storage.exists(weights):
        return ImageTower(storage.read_bytes(xml), storage.read_bytes(weights)), True
    tower = _converted(spec)
    storage.write_atomic(weights, tower.weights)
    storage.write_atomic(xml, tower.xml)
    return tower, False


def _model_key(spec: ModelSpec) -> str:
    """What the model is, whatever model_version it is filed under: its name and its weights."""
    weights = spec.checkpoint_sha256 or spec.pretrained
    return hashlib.sha256(f"{spec.name}\0{weights}".encode()).hexdigest()[:12]


def _converted(spec: ModelSpec) -> ImageTower:
    """The image tower traced in fp32 and converted, with a dynamic batch dimension."""
    import torch

    from .clip import load_model

    ov = import_openvino()
    clip = load_model(spec, precision="fp32")
    height, width = clip.pixels.size
    example = torch.zeros(TRACE_BATCH, 3, height, width)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
        # check_trace=False: re-running the trace to compare fails on open_clip's towers (nothing is wrong)
        traced = torch.jit.trace(clip.model.visual, example, check_trace=False)
        converted = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, 3, height, width])])
    with storage.scratch_folder("rayclip-openvino-") as scratch:
        ov.save_model(converted, scratch / "model.xml", compress_to_fp16=False)  # fp32 weights: vectors stay exact
        return ImageTower(storage.read_bytes(scratch / "model.xml"), storage.read_bytes(scratch / "model.bin"))


def compiled(tower: ImageTower, precision: str, threads: int | None = None):
    """The IR compiled for this machine's CPU, computing at `precision`: called with a float32 NCHW
    numpy batch, it returns the tower's features as its first output."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(model=tower.xml, weights=ov.Tensor(np.frombuffer(tower.weights, np.uint8)))
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return core.compile_model(model, "CPU", config)
