"""Train the offline reference model: a small open_clip architecture on the synthetic scenes.

`rayclip train-reference` reproduces the checkpoint shipped in rayclip/weights/ (fixed seed,
fixed number of steps, CPU). The loss is open_clip's own ClipLoss; batches hold distinct
captions so that no positive pair is counted as a negative.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import synthetic
from .model import REFERENCE_MODEL, quiet_root_logger, register_configs
from .options import TrainOptions
from .store import storage


def _render_training_set(n: int, rng: np.random.Generator, preprocess) -> tuple[object, np.ndarray]:
    """n images (random sides 128-320 px) through the model's own eval preprocessing."""
    import torch

    scene_ids = rng.integers(0, len(synthetic.ALL_SCENES), size=n)
    pixels = torch.stack(
        [preprocess(synthetic.render(synthetic.ALL_SCENES[i], int(rng.integers(128, 321)), rng)) for i in scene_ids]
    )
    return pixels.to(torch.bfloat16), scene_ids


def train_reference(
    out: Path,
    seed: int = TrainOptions.seed,
    steps: int = TrainOptions.steps,
    batch_size: int = 192,
    images: int = 12_000,
    lr: float = 2e-3,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train and save fp16 weights to `out` (atomically); returns a summary."""
    import open_clip
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    register_configs()
    with quiet_root_logger():  # "initialized randomly" is the point here
        model, _, preprocess = open_clip.create_model_and_transforms(REFERENCE_MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(REFERENCE_MODEL)
    captions = tokenizer([scene.caption for scene in synthetic.ALL_SCENES])
    pixels, scene_ids = _render_training_set(images, rng, preprocess)
    by_scene = [np.flatnonzero(scene_ids == i) for i in range(len(synthetic.ALL_SCENES))]
    render_s = time.monotonic() - started

    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        # Distinct scenes per batch: a repeated caption would be a false negative for the loss.
        chosen = rng.choice(len(by_scene), size=min(batch_size, len(by_scene)), replace=False)
        rows = [rng.choice(by_scene[i]) for i in chosen if len(by_scene[i])]
        kept = [i for i in chosen if len(by_scene[i])]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_features, text_features, logit_scale = model(pixels[rows].float(), captions[kept])[:3]
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        loss_value = float(loss.detach())
        if progress and (step % 25 == 0 or step == steps - 1):
            progress(step, loss_value)

    # Saved through a buffer: torch.save names the archive after its file, and a temporary name
    # would make the bytes (and so the recorded checkpoint sha256) differ from run to run.
    buffer = io.BytesIO()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, buffer)
    storage.write_atomic(out, buffer.getvalue())
    return {
        "out": str(out),
        "bytes": storage.size(out),
        "seed": seed,
        "steps": steps,
        "final_loss": round(loss_value, 4),
        "render_s": round(render_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
