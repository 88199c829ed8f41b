"""Loading an open_clip model (`load_model`, `ClipModel`) and encoding with it: images and texts in,
L2-normalised float32 numpy vectors out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections import OrderedDict

import numpy as np

from ..errors import UserError
from ..options import ModelOptions
from .names import RANDOM_INIT, ModelSpec, check_available, import_model_libraries
from .precision import choose_precision

RANDOM_SEED = 0
TEXT_CACHE_SIZE = 1024  # recent query embeddings kept per model
MODELS_KEPT = 2  # query models a process keeps for the next load_model(kept=True) (ViT-B-32: 0.6 GB at fp32)


@contextlib.contextmanager
def quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclasses.dataclass
class ModelParts:
    """A loaded model as plain data (ClipModel.parts): put once into Ray's object store, every actor
    rebuilds the model from it (ClipModel.from_parts) instead of loading or initialising its own."""

    spec: ModelSpec  # with the precision the weights are in
    tensors: dict[str, object]  # every parameter and buffer by name, as numpy (_as_numpy)
    preprocess: object  # open_clip's image transform
    image_tower: object = None  # openvino.ImageTower: the image tower to run on OpenVINO instead of torch


def _as_numpy(tensor):
    """A CPU tensor as numpy, which Ray's object store shares without copying; numpy has no bfloat16,
    so 16-bit floats travel as their bits with the dtype's name."""
    import torch

    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16).numpy(), str(tensor.dtype).removeprefix("torch.")
    return tensor.numpy()


def _from_numpy(array):
    """Back from _as_numpy (an array from the object store is read-only: torch warns, and the model never writes it)."""
    import warnings

    import torch

    array, dtype = array if isinstance(array, tuple) else (array, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype)) if dtype else tensor


class Pixels:
    """A model's preprocessing up to its input pixels: a decoded picture (an RGB PIL image, or a uint8
    CHW tensor on any device) resized and cropped to the model's input size as a uint8 CHW tensor,
    a quarter of the bytes of float pixels. Picklable: Ray's decode tasks get it without the model."""

    def __init__(self, geometry, size: tuple[int, int]) -> None:
        self.geometry, self.size = geometry, size

    def __call__(self, picture) -> object:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        shaped = self.geometry(picture)  # torchvision's Resize and CenterCrop take either kind
        return shaped if isinstance(shaped, torch.Tensor) else pil_to_tensor(shaped)

    @staticmethod
    def stack(tensors: list) -> object:
        import torch

        return torch.stack(tensors)


class ClipModel:
    """An open_clip model in eval mode with its preprocessing and tokenizer.

    `precision` goes to open_clip's own `precision` argument: bf16/fp16 hold the weights in half
    precision with LayerNorm kept fp32 (open_clip's mixed mode); the vectors leave as fp32.
    """

    def __init__(self, spec: ModelSpec, device: str = "cpu", precision: str = ModelOptions.precision):
        import_model_libraries(spec.name)
        import open_clip
        import torch

        precision = choose_precision(precision, device)
        check_available(spec)
        torch.manual_seed(RANDOM_SEED)  # random init is identical in every actor and every run
        pretrained = spec.checkpoint or (None if spec.pretrained in (RANDOM_INIT, "hf-hub") else spec.pretrained)
        try:
            # open_clip logs "initialized randomly" at WARNING on the root logger; the CLI says it once itself.
            with quiet_root_logger():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=pretrained, device=device, precision=precision
                )
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise UserError(f"cannot load {spec.name} ({spec.pretrained}): {str(exc).splitlines()[0]}") from None
        self._ready(dataclasses.replace(spec, precision=precision), model, preprocess, device)

    def _ready(self, spec: ModelSpec, model, preprocess, device: str) -> None:
        """The loaded model in eval mode, and its preprocessing split where the pixels become floats."""
        import open_clip
        import torch
        from torchvision.transforms import Compose, ToTensor

        self.spec, self.device, self.precision = spec, device, spec.precision
        self.input_dtype = open_clip.get_input_dtype(self.precision) or torch.float32
        self.model = model.eval()
        self.preprocess = preprocess
        steps = list(preprocess.transforms)
        cut = next(i for i, step in enumerate(steps) if isinstance(step, ToTensor))
        # Split where the pixels become floats: resize and crop before (Pixels), /255 and Normalize after.
        self.pixels = Pixels(Compose(steps[:cut]), tuple(model.visual.image_size))
        self._normalize = Compose(steps[cut + 1 :])
        self.dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
        self._torch = torch
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_lock = threading.Lock()
        self._image_tower = None  # the compiled OpenVINO tower, when the parts carry one (from_parts)

    @functools.cached_property
    def tokenizer(self):
        """Built on first use: an embed actor never tokenizes (an hf-hub model's would import transformers)."""
        import open_clip

        return open_clip.get_tokenizer(self.spec.name)

    @property
    def context_length(self) -> int:
        return getattr(self.tokenizer, "context_length", 77)

    def parts(self, image_tower=None) -> ModelParts:
        """What another process needs to rebuild this model without loading or initialising it again.
        With `image_tower` (openvino.ImageTower) they carry it instead of torch's image tower weights."""
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        if image_tower is not None:
            tensors = {name: t for name, t in tensors.items() if not name.startswith("visual.")}
        arrays = {name: _as_numpy(t.detach().cpu()) for name, t in tensors.items()}
        return ModelParts(self.spec, arrays, self.preprocess, image_tower)

    @classmethod
    def from_parts(cls, parts: ModelParts, device: str = "cpu", threads: int | None = None) -> ClipModel:
        """The model parts() describes, on `device`: its architecture built without initialising weights
        (on torch's meta device), then every parameter and buffer set from the parts; an image tower
        the parts carry is compiled for OpenVINO (torch's stays on the meta device, never used)."""
        import_model_libraries(parts.spec.name)
        import open_clip
        import torch

        if threads:
            torch.set_num_threads(threads)
        with quiet_root_logger(), torch.device("meta"):
            model = open_clip.create_model(parts.spec.name, precision=parts.spec.precision, device="meta")
        for name, array in parts.tensors.items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            tensor = _from_numpy(array).to(device)
            if leaf in module._parameters:
                # requires_grad as open_clip leaves it: off, torch's attention projected 3-D inputs with
                # a batched matmul over a copy of the weight per position (the text tower ran 3x slower).
                module._parameters[leaf] = torch.nn.Parameter(tensor)
            else:
                module._buffers[leaf] = tensor
        clip = cls.__new__(cls)
        clip._ready(parts.spec, model, parts.preprocess, device)
        if parts.image_tower is not None:
            from .openvino import compiled

            clip._image_tower = compiled(parts.image_tower, parts.spec.precision, threads)
        return clip

    def _normalised(self, features) -> np.ndarray:
        features = features.float()  # normalise in fp32 whatever the model computed in
        features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy()

    def stack(self, pixels: list) -> object:
        """Preprocessed images (one tensor each) → one batch tensor for encode_pixels."""
        return self._torch.stack(pixels)

    def normalise(self, pixels) -> object:
        """A uint8 batch of Pixels → the model's input on its device: the rest of preprocess (/255 as
        ToTensor does it, Normalize), for the whole batch on the device; equal to preprocess() image by image."""
        floats = pixels.to(self.device, non_blocking=True).float().div_(255)
        return self._normalize(floats)

    def encode_uint8(self, pixels) -> np.ndarray:
        """A uint8 NCHW batch of Pixels (a tensor, or numpy from Ray) → (n, dim) L2-normalised float32."""
        return self.encode_pixels(self.normalise(_from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels))

    def preprocess_images(self, images: list) -> object:
        return self.stack([self.preprocess(img) for img in images])

    def encode_pixels(self, pixels) -> np.ndarray:
        if self._image_tower is not None:  # OpenVINO takes fp32 in and computes at the run's precision
            features = self._image_tower(pixels.float().cpu().numpy())[0]
            return self._normalised(self._torch.from_numpy(features))
        with self._torch.inference_mode():
            return self._normalised(self.model.encode_image(pixels.to(self.device, self.input_dtype)))

    def encode_images(self, images: list) -> np.ndarray:
        """PIL images → (n, dim) L2-normalised float32."""
        return self.encode_pixels(self.preprocess_images(images))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Strings → (n, dim) L2-normalised float32 (longer texts are truncated by the tokenizer).

        Recent texts come from an LRU cache: a repeated query (a search box, a server under load)
        skips the text tower, which is most of a warm query's time.
        """
        with self._text_cache_lock:
            known = {t: self._text_cache[t] for t in texts if t in self._text_cache}
            for text in known:
                self._text_cache.move_to_end(text)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            with self._torch.inference_mode():
                fresh = self._normalised(self._encode_tokens(tokens))
            fresh.setflags(write=False)  # cached rows are shared between callers
            known |= dict(zip(missing, fresh))
            with self._text_cache_lock:
                self._text_cache.update(zip(missing, fresh))
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, self.dim or 0), np.float32)

    def _encode_tokens(self, tokens):
        """The text tower on the batch's real tokens only, where that is exact; on all of them otherwise."""
        if not trims_padding(self.model):
            return self.model.encode_text(tokens)
        import open_clip

        # Argmax pooling reads each text at its end-of-text token (the highest id); past the furthest
        # one there is only padding, which under the causal mask no earlier position attends to.
        n = int(tokens.argmax(dim=-1).max()) + 1
        return open_clip.CLIP.encode_text(_TrimmedText(self.model, n), tokens[:, :n])

    def token_count(self, text: str) -> int:
        """Tokens the text needs, start and end markers included (to tell whether it gets truncated)."""
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(text)) + 2 if encode else 0


def trims_padding(model) -> bool:
    """Whether the text tower is open_clip's own CLIP text transformer, causal and pooled at the
    end-of-text token, so that running it on a prefix of the tokens gives the same features.
    Towers from Hugging Face (CustomTextCLIP), bidirectional ones and other pooling do not qualify."""
    import open_clip

    return type(model) is open_clip.CLIP and model.text_pool_type == "argmax" and model.attn_mask is not None


class _TrimmedText:
    """The model as `CLIP.encode_text` sees it, with position embeddings and causal mask cut to the
    first n tokens (so open_clip's own code runs, and the shared model is never modified)."""

    def __init__(self, model, n: int):
        self._model = model
        self.positional_embedding = model.positional_embedding[:n]
        self.attn_mask = model.attn_mask[:n, :n]

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def load_model(
    spec: ModelSpec,
    device: str = "cpu",
    threads: int | None = None,
    precision: str = ModelOptions.precision,
    kept: bool = False,
) -> ClipModel:
    """The model `spec` names on `device` at `precision` (choose_precision), torch on `threads`. With
    `kept` (a query model: Searcher.load) the process keeps the last MODELS_KEPT models so loaded,
    and the same one asked for again (the next Searcher.open in a notebook, the next test in a test
    process) is not loaded again; a run's own model (embed's driver) goes once the run lets it go."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return (_kept if kept else ClipModel)(spec, device, precision)


@functools.lru_cache(maxsize=MODELS_KEPT)
def _kept(spec: ModelSpec, device: str, precision: str) -> ClipModel:
    return ClipModel(spec, device=device, precision=precision)
