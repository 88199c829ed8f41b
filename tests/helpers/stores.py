"""Reading and checking data roots the way the tests need it: an ingest with the tests' timeout,
every committed silver row, and open_clip's own vectors to hold silver against."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rayclip.cli import main
from rayclip.stages import ingest


@dataclass(frozen=True)
class GoldStore:
    """The gold store: its data root and the BuildReport of its published build."""

    root: Path
    build: object  # rayclip.stages.index.BuildReport


def cli(*args: str) -> int:
    """`rayclip ARGS` in this process: the CLI's exit code (its output is the test's capsys)."""
    return main(list(args))


def run_ingest(data_dir: Path, metadata_path: Path, **kwargs) -> ingest.IngestReport:
    return ingest.ingest_metadata(data_dir, metadata_path, timeout=3, **kwargs)


def embed_runs(root) -> list[dict]:
    """Every embed run record under a data root (local or object store), oldest first."""
    from rayclip.store import catalog

    return sorted((r for stage, _, r in catalog.run_records(root) if stage == "embed"), key=lambda r: r["run_id"])


def read_silver(root: Path, model_version: str) -> pa.Table:
    """Every committed silver row of a model_version, read back from Parquet (local or object store)."""
    from rayclip.store import catalog, storage

    tables = []
    for f in catalog.silver_files(root, model_version):
        with storage.open_input(f) as opened:
            tables.append(pq.read_table(opened))
    return pa.concat_tables(tables)


def vectors_by_id(root: Path, model_version: str) -> dict:
    """media_id -> its committed silver vector (float32)."""
    from rayclip.store import catalog

    table = read_silver(root, model_version)
    return dict(zip(table.column("media_id").to_pylist(), catalog.vector_matrix(table)))


def open_clip_embeddings(root: Path, media_ids: list[str]):
    """What open_clip itself says for these objects' bytes (the reference model), without any
    rayclip code in the way but the manifest's paths."""
    import open_clip
    import torch
    from PIL import Image

    from rayclip import model
    from rayclip.store import catalog

    open_clip.add_model_config(model.CONFIG_DIR)
    net, _, preprocess = open_clip.create_model_and_transforms(
        model.REFERENCE_MODEL, pretrained=str(model.REFERENCE_WEIGHTS)
    )
    paths = dict(zip(*catalog.read_manifest(root, ["media_id", "path"]).to_pydict().values()))
    pixels = torch.stack([preprocess(Image.open(root / paths[m]).convert("RGB")) for m in media_ids])
    with torch.no_grad():
        features = net.eval().encode_image(pixels)
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def assert_rows_are_open_clips(root: Path, silver: pa.Table) -> None:
    """Each silver row's vector is open_clip's own for that row's media_id, and no other row's."""
    import numpy as np

    from rayclip.store import catalog

    ids = silver.column("media_id").to_pylist()
    cosine = catalog.vector_matrix(silver) @ open_clip_embeddings(root, ids).T
    assert np.all(np.diag(cosine) > 0.9999)
    # and the check can tell rows apart: no row matches another media_id that well
    assert cosine[~np.eye(len(ids), dtype=bool)].max() < 0.9999


def a_media(root) -> dict:
    """The data root's first manifest row (an image the store holds)."""
    from rayclip.store import catalog

    return catalog.read_manifest(root).to_pylist()[0]


def status(root, capsys) -> dict:
    """`rayclip status --json` on a data root (local or a store), read back from the test's capsys."""
    from rayclip.store import storage

    capsys.readouterr()
    assert cli("status", "--data-dir", storage.uri(root), "--json") == 0
    return json.loads(capsys.readouterr().out)


def copy_in(source: Path, root, keep: Callable[[str], bool] = lambda relative: True) -> None:
    """The files of a local data root (those `keep` takes, by relative path) copied byte for byte into
    `root`, local or on a store."""
    from rayclip.store import storage

    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_file() and keep(relative):
            storage.write_atomic(root / relative, path.read_bytes())
