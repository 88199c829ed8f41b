"""Side by side: clip-retrieval 2.45's `inference` and `rayclip embed`, whole commands, same JPEGs, same weights.

    .venv/bin/python benchmarks/bench_vs_clip_retrieval.py [--images 1024] [--venv DIR]

clip-retrieval runs unpatched in a virtual environment of its own (made on first use with
`python -m venv` and `pip install clip-retrieval==2.45.0 "setuptools<81"`; its install is not timed). Both commands
read the same generated LAION-sized JPEGs (bench_embed.make_images): clip-retrieval from the
folder (`--input_format files`), rayclip from its bronze store after `ingest --folder` (not timed:
clip-retrieval has no ingest). Both load one ViT-B-32 checkpoint file, random weights seeded here:
clip-retrieval through all_clip (`open_clip:ViT-B-32/<file>`, which hands the path to open_clip's
create_model_and_transforms as `pretrained`), rayclip with `--pretrained <file>`. Each command's
defaults otherwise, except clip-retrieval's decode workers, set to the cores (`--num_prepro_workers`),
and its text encoding off (the JPEGs have no captions). One run each; prints both whole-command
images/s and their ratio, and the cosine of the two commands' vectors for the same images (1.0 up to
the precision each computes at: clip-retrieval fp32 on CPUs, rayclip `auto`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_embed import MODEL, make_images

from rayclip import model
from rayclip.stages import ingest
from rayclip.store import catalog, layout

# clip-retrieval's CLIP loader (clip-anytorch) imports pkg_resources, which setuptools 81 removed.
CLIP_RETRIEVAL = ["clip-retrieval==2.45.0", "setuptools<81"]
DEFAULT_VENV = Path.home() / ".cache" / "rayclip-bench" / "clip-retrieval-2.45"


def clip_retrieval_venv(folder: Path) -> Path:
    """The clip-retrieval command in its own virtual environment, installed there on first use."""
    command = folder / "bin" / "clip-retrieval"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", *CLIP_RETRIEVAL], check=True)
    return command


def write_checkpoint(path: Path) -> Path:
    """ViT-B-32 with seeded random weights, as a plain state_dict file both commands load."""
    import torch

    clip = model.load_model(model.resolve(MODEL, model.RANDOM_INIT), precision="fp32")
    torch.save(clip.model.state_dict(), path)
    return path


def timed(command: list[str], env: dict | None = None) -> float:
    """The command's wall time in seconds (it must succeed)."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{command[0]} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return seconds


def clip_retrieval_vectors(output: Path) -> tuple[list[str], np.ndarray]:
    """(each row's image file, its vector) as clip-retrieval wrote them: aligned by position only."""
    vectors = np.concatenate([np.load(f) for f in sorted((output / "img_emb").glob("img_emb_*.npy"))])
    files = [
        path
        for f in sorted((output / "metadata").glob("metadata_*.parquet"))
        for path in pq.read_table(f).column("image_path").to_pylist()
    ]
    return files, vectors


def rayclip_vectors(root: Path, model_version: str) -> dict[str, np.ndarray]:
    table = catalog.read_silver(root, model_version, layout.EMBEDDINGS, ["media_id", "embedding"])
    return dict(zip(table.column("media_id").to_pylist(), catalog.vector_matrix(table)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="clip-retrieval's virtual environment")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    command = clip_retrieval_venv(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images)
        checkpoint = write_checkpoint(tmp / "vit_b32_random.pt")
        root = tmp / "data"
        ingest.ingest_folder(root, tmp / "images")
        print(f"{args.images} JPEGs, 256-640 px; {MODEL}, one random-weight checkpoint; {cpus} CPUs")

        output = tmp / "clip_retrieval"
        theirs = timed(
            [str(command), "inference", "--input_dataset", str(tmp / "images"), "--output_folder", str(output)]
            + ["--input_format", "files", "--clip_model", f"open_clip:{MODEL}/{checkpoint}"]
            + ["--enable_text", "False", "--num_prepro_workers", str(cpus)]
        )
        rayclip = [sys.executable, "-m", "rayclip.cli", "embed", "--data-dir", str(root), "--model", MODEL]
        ours = timed(rayclip + ["--pretrained", str(checkpoint), "--json"], env=os.environ | {"RAY_ADDRESS": ""})

        runs = [json.loads(p.read_text()) for p in layout.embed_runs_dir(root).glob("*.json")]
        run = next(r for r in runs if r["rows_embedded"])
        files, their_vectors = clip_retrieval_vectors(output)
        ours_by_id = rayclip_vectors(root, run["model_version"])
        ids = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
        cosines = np.einsum("ij,ij->i", their_vectors / np.linalg.norm(their_vectors, axis=1, keepdims=True),
                            np.stack([ours_by_id[i] for i in ids]))  # fmt: skip
        their_rate, our_rate = len(files) / theirs, run["rows_embedded"] / ours
        print(f"clip-retrieval inference (fp32, {cpus} decode workers): {their_rate:7.2f} images/s ({theirs:.1f} s)")
        print(
            f"rayclip embed ({run['precision']}, defaults):              {our_rate:7.2f} images/s ({ours:.1f} s; "
            f"steady {run['steady_images_per_s']} images/s)"
        )
        print(f"rayclip / clip-retrieval, whole command: {our_rate / their_rate:.2f}")
        print(f"same weights: cosine of the two vectors per image, min {cosines.min():.5f}, mean {cosines.mean():.5f}")


if __name__ == "__main__":
    main()
