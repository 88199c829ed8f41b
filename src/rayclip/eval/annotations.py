"""A retrieval benchmark's annotation file, read: the images it names and their captions, in the
order clip_benchmark reads them (Karpathy split JSON: file order; COCO captions: by image id)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import UserError

DATASETS = ("karpathy", "coco")


@dataclasses.dataclass(frozen=True)
class AnnotatedImage:
    """One image file that a benchmark's annotation file names, with its captions in file order."""

    file: Path
    captions: tuple[str, ...]


def _load_annotations(path: Path, dataset: str) -> dict:
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path.name} has no `images` list: not a {dataset} annotation file")
    return data


def _image_file(images: Path, subfolder: str, name: str) -> Path:
    """Where an annotated file is: under its subfolder (Karpathy's `filepath`, e.g. val2014), else directly."""
    nested = images / subfolder / name
    return nested if nested.is_file() or not (images / name).is_file() else images / name


def read_karpathy(annotations: Path, images: Path, split: str = "test") -> list[AnnotatedImage]:
    """One split of a Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json), in file order."""
    entries = _load_annotations(annotations, "Karpathy split")["images"]
    try:
        chosen = [e for e in entries if e["split"] == split]
        if not chosen:
            present = ", ".join(sorted({e["split"] for e in entries}))
            raise UserError(f"no images in split {split!r} of {annotations.name}; its splits: {present} (pass --split)")
        return [
            AnnotatedImage(
                _image_file(images, e.get("filepath", ""), e["filename"]), tuple(s["raw"] for s in e["sentences"])
            )
            for e in chosen
        ]
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{annotations.name} is not a Karpathy split file (no {exc} in an entry); COCO's own file is --dataset coco"
        ) from None


def read_coco(annotations: Path, images: Path) -> list[AnnotatedImage]:
    """Every image of a COCO captions file, by image id (the order of torchvision's CocoCaptions,
    which clip_benchmark reads COCO with); each image's captions in annotation order."""
    data = _load_annotations(annotations, "COCO captions")
    try:
        captions: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
        for annotation in data["annotations"]:
            if annotation["image_id"] not in captions:
                raise UserError(f"{annotations.name}: a caption names image id {annotation['image_id']}, not listed")
            captions[annotation["image_id"]].append(annotation["caption"])
        ordered = sorted(data["images"], key=lambda image: image["id"])
        return [AnnotatedImage(_image_file(images, "", i["file_name"]), tuple(captions[i["id"]])) for i in ordered]
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{annotations.name} is not a COCO captions file (no {exc}); a Karpathy split JSON is --dataset karpathy"
        ) from None


def read_annotations(dataset: str, annotations: Path, images: Path, split: str | None = None) -> list[AnnotatedImage]:
    """The evaluated images and captions; every named file must be under `images`."""
    if dataset not in DATASETS:
        raise UserError(f"unknown --dataset {dataset!r}; use one of: {', '.join(DATASETS)}")
    if not images.is_dir():
        raise UserError(f"images folder not found: {images}")
    if dataset == "coco":
        if split is not None:
            raise UserError("--split is for --dataset karpathy; a COCO captions file holds one split")
        chosen = read_coco(annotations, images)
    else:
        chosen = read_karpathy(annotations, images, split or "test")
    if not any(item.captions for item in chosen):
        raise UserError(f"{annotations.name} holds no captions for the images evaluated; nothing to query")
    missing = [item.file for item in chosen if not item.file.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(chosen)} images in {annotations.name} are not under {images} "
            f"(first: {missing[0]}); pass the folder that holds them as --images-dir"
        )
    return chosen
