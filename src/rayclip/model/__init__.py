"""The only package that knows open_clip: naming a model (`names.py`: ModelSpec, resolve, the checks),
choosing its precision (`precision.py`), loading it and encoding images and texts (`clip.py`),
holding the memory it frees between batches (`allocator.py`), and its image tower converted to
OpenVINO for `--runtime openvino` (`openvino.py`, an optional extra).

Every loading path goes through `load_model`: a named pretrained tag (Hugging Face cache or
download), a local checkpoint file, `hf-hub:` ids, random init (`none`, seeded, for plumbing) and
the project's own offline reference model (`reference`). Encoders always return L2-normalised
float32 numpy arrays. Callers use the names below.
"""

from .allocator import hold_freed_memory
from .clip import RANDOM_SEED, ClipModel, ModelParts, Pixels, load_model, quiet_root_logger, trims_padding
from .names import (
    CONFIG_DIR,
    RANDOM_INIT,
    REFERENCE_ALIAS,
    REFERENCE_MODEL,
    REFERENCE_WEIGHTS,
    ModelSpec,
    check_available,
    check_names,
    import_model_libraries,
    named,
    register_configs,
    resolve,
)
from .openvino import ImageTower, image_tower, import_openvino
from .precision import choose_precision, cpu_flags

__all__ = [
    "CONFIG_DIR",
    "RANDOM_INIT",
    "RANDOM_SEED",
    "REFERENCE_ALIAS",
    "REFERENCE_MODEL",
    "REFERENCE_WEIGHTS",
    "ClipModel",
    "ImageTower",
    "ModelParts",
    "ModelSpec",
    "Pixels",
    "check_available",
    "check_names",
    "choose_precision",
    "cpu_flags",
    "hold_freed_memory",
    "image_tower",
    "import_model_libraries",
    "import_openvino",
    "load_model",
    "named",
    "quiet_root_logger",
    "register_configs",
    "resolve",
    "trims_padding",
]
