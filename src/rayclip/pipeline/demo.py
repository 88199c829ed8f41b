"""The demo: the whole pipeline offline, on synthetic captioned images served on loopback, then a few
of the captions searched back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import DemoOptions, EmbedOptions, EvalOptions
from ..store import storage
from .evaluation import EvalRun, evaluate_metadata
from .runner import QUIET, Hooks

if TYPE_CHECKING:
    from ..query.results import SearchResults

# The demo's images are served on a fixed port, so a rerun's URLs are the ones the manifest holds.
DEMO_PORT = 8731
DEMO_SAMPLE_QUERIES = 4


@dataclasses.dataclass(frozen=True)
class DemoSite:
    """The demo's generated images, served on loopback, and the LAION-style metadata naming them."""

    folder: Path
    images: int
    seed: int
    base_url: str
    metadata: Path


@dataclasses.dataclass
class DemoRun:
    root: Path
    site: DemoSite
    run: EvalRun
    samples: list[tuple[str, SearchResults]]  # a few of the captions, searched back


@contextlib.contextmanager
def serve_demo_site(site: Path) -> Iterator[str]:
    """The demo's images on DEMO_PORT; on a free port when that one is taken (a rerun then fetches again)."""
    from .. import synthetic

    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(synthetic.serve_folder(site, port=DEMO_PORT))
        except OSError:
            base = stack.enter_context(synthetic.serve_folder(site))
        yield base


def run_demo(
    data_dir: str | os.PathLike | None = None,
    images: int = DemoOptions.images,
    seed: int = DemoOptions.seed,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    recall_at: tuple[int, ...] = EvalOptions.recall_at,
    hooks: Hooks = QUIET,
) -> DemoRun:
    """The whole pipeline offline: `images` synthetic captioned JPEGs (a seed training never used)
    served on loopback → img2dataset → Ray Data with the reference model → FAISS → Recall@K,
    then a few of the captions searched back. data_dir None: `demo` under the default data root."""
    from .. import model, synthetic

    root = storage.data_root(data_dir) if data_dir else storage.data_root() / "demo"
    folder = root / "site"
    generated = synthetic.write_images(folder, images, seed=seed)
    spec = model.resolve(None, model.REFERENCE_ALIAS)
    with serve_demo_site(folder) as base:
        site = DemoSite(folder, generated.num_rows, seed, base, root / "metadata.parquet")
        synthetic.write_metadata(generated, base, site.metadata)
        hooks.report(site, hooks.terminal())
        run = evaluate_metadata(root, site.metadata, spec, recall_at, actors, batch_size, hooks=hooks)
    # Captions spread over the generated set, so each query has at least one true match.
    captions = generated.column("caption").to_pylist()
    queries = captions[:: max(1, len(captions) // DEMO_SAMPLE_QUERIES)][:DEMO_SAMPLE_QUERIES]
    return DemoRun(root, site, run, [(query, run.searcher.search_text(query, k=3)) for query in queries])
