"""A seeded synthetic captioned image set, served over loopback HTTP as LAION-style metadata.

Each image is one shape (5 kinds) of one colour (6) and size (2) at one position (5) on one
background (2): 600 distinct captions. Jitter, rotation and sensor-like noise make every image
unique and its JPEG a realistic size. Captions name every attribute, so retrieval quality on a
held-out seed measures whether a model (and the pipeline around it) really aligns text and image.
The same scenes, five captions each, are also written in the retrieval benchmarks' annotation
formats (Karpathy split JSON, COCO captions) for `rayclip eval --dataset`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import itertools
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SIZES = {"small": 0.16, "large": 0.34}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25)}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"


ALL_SCENES = tuple(Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS))


def random_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    return [ALL_SCENES[i] for i in rng.integers(0, len(ALL_SCENES), size=n)]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [
            (r * math.cos(angle + k * math.pi / 2 + math.pi / 4), r * math.sin(angle + k * math.pi / 2 + math.pi / 4))
            for k in range(4)
        ]
    elif shape == "triangle":
        corners = [
            (
                r * math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2),
                r * math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2),
            )
            for k in range(3)
        ]
    elif shape == "star":
        corners = [
            (
                (r if k % 2 == 0 else r * 0.45) * math.cos(angle + k * math.pi / 5 - math.pi / 2),
                (r if k % 2 == 0 else r * 0.45) * math.sin(angle + k * math.pi / 5 - math.pi / 2),
            )
            for k in range(10)
        ]
    else:  # cross: a plus sign of arms r long and r/3 wide
        w = r / 3
        outline = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        corners = [(x * c - y * s, x * s + y * c) for x, y in outline]
    return [(cx + x, cy + y) for x, y in corners]


def render(scene: Scene, side: int, rng: np.random.Generator) -> Image.Image:
    """Draw one scene on a square canvas of `side` pixels."""
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    # Noise on a fixed 64x64 grid, scaled up: it looks the same to a model at every image size.
    noise = rng.normal(0.0, 14.0, size=(64, 64, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = (fx + jitter[0]) * side, (fy + jitter[1]) * side
    r = SIZES[scene.size] * side * rng.uniform(0.85, 1.1)
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=colour)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: int) -> pa.Table:
    """Write n JPEGs (256–512 px) into folder; returns their table of (filename, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, captions = [], []
    for i, scene in enumerate(random_scenes(n, rng)):
        name = f"img_{seed}_{i:06d}.jpg"
        side = int(rng.integers(256, 513))
        (folder / name).write_bytes(jpeg_bytes(render(scene, side, rng), quality=int(rng.integers(80, 96))))
        names.append(name)
        captions.append(scene.caption)
    table = pa.table({"filename": names, "caption": captions})
    pq.write_table(table, folder / "captions.parquet")
    return table


def write_metadata(images: pa.Table, base_url: str, path: Path) -> Path:
    """LAION-format metadata (URL, TEXT) pointing at the images served under base_url."""
    urls = [f"{base_url}/{name}" for name in images.column("filename").to_pylist()]
    pq.write_table(pa.table({"URL": urls, "TEXT": images.column("caption")}), path)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class names it so
        pass


@contextlib.contextmanager
def serve_folder(folder: Path, port: int = 0) -> Iterator[str]:
    """Serve a folder over HTTP on 127.0.0.1 (a free port by default); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- benchmark-format fixtures


def caption_variants(scene: Scene) -> list[str]:
    """Five captions of one scene, worded as different annotators might (benchmarks carry five per image).

    Two of them leave attributes out, as people do, so they also fit other scenes.
    """
    where = "in the center" if scene.position == "center" else f"on the {scene.position}"
    full = scene.caption
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return [
        full,
        f"a photo of {full}",
        full.removeprefix("a "),
        f"a {scene.size} {scene.colour} {scene.shape} {where}",
        f"{article} {scene.colour} {scene.shape} on a {scene.background} background",
    ]


def write_captioned_images(folder: Path, n: int, seed: int) -> list[dict]:
    """n JPEGs of n distinct scenes in folder; returns [{filename, captions, width, height}] in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i, scene_id in enumerate(rng.choice(len(ALL_SCENES), size=n, replace=False)):
        scene = ALL_SCENES[scene_id]
        side = int(rng.integers(256, 513))
        name = f"img_{seed}_{i:06d}.jpg"
        (folder / name).write_bytes(jpeg_bytes(render(scene, side, rng), quality=int(rng.integers(80, 96))))
        images.append({"filename": name, "captions": caption_variants(scene), "width": side, "height": side})
    return images


def write_karpathy(images: list[dict], splits: list[str], path: Path) -> Path:
    """The Karpathy split JSON (dataset_flickr30k.json's layout), one split name per image."""
    entries, sentid = [], 0
    for imgid, (image, split) in enumerate(zip(images, splits, strict=True)):
        sentences = []
        for raw in image["captions"]:
            sentences.append({"raw": raw, "tokens": raw.lower().split(), "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append(
            {
                "filename": image["filename"],
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    path.write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    return path


def write_coco_captions(images: list[dict], path: Path) -> Path:
    """COCO's captions file (captions_val2017.json's layout): images, and one annotation per caption."""
    entries = [
        {"id": 1000 + i, "file_name": image["filename"], "width": image["width"], "height": image["height"]}
        for i, image in enumerate(images)
    ]
    pairs = [(1000 + i, caption) for i, image in enumerate(images) for caption in image["captions"]]
    annotations = [
        {"id": j + 1, "image_id": image_id, "caption": caption} for j, (image_id, caption) in enumerate(pairs)
    ]
    path.write_text(json.dumps({"info": {"description": "synthetic"}, "images": entries, "annotations": annotations}))
    return path
