"""The bronze layer read back for the ingest tests: manifest rows, stored objects checked whole, and
the ingest runs' work folders."""

from __future__ import annotations

import hashlib

from rayclip.store import catalog, layout, storage

# What an ingest decides about a row; run_id, source and ingested_at differ between runs.
ROW_FIELDS = ("media_id", "path", "url", "caption", "width", "height", "format", "size_bytes")


def manifest_rows(root) -> list[tuple]:
    rows = catalog.read_manifest(root).to_pylist()
    return sorted(tuple(row[f] for f in ROW_FIELDS) for row in rows)


def objects(root) -> dict[str, bytes]:
    """name -> bytes of every object under bronze/objects/ by its final name, each checked whole (its
    sha256 is its name). A local writer killed mid-write leaves only a hidden temporary, which no
    reader lists (an object store has none)."""
    found = {
        obj.name: storage.read_bytes(obj)
        for obj in storage.glob(layout.objects_dir(root), "*/*")
        if not obj.name.startswith(".")
    }
    for name, data in found.items():
        assert hashlib.sha256(data).hexdigest() == name.split(".")[0], f"partial object {name}"
    return found


def check_objects(root) -> None:
    """Every object is whole and every manifest row names one of them."""
    stored = objects(root)
    for row in catalog.read_manifest(root).to_pylist():
        assert row["path"].rsplit("/", 1)[1] in stored


def downloads(root) -> list:
    """The ingest runs' work folders left under bronze/downloads/ (none once a run has ended)."""
    return storage.children(layout.downloads_dir(root, "any").parent)
