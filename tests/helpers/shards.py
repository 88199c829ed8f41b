"""WebDataset tars written in memory, for the shard ingest tests."""

from __future__ import annotations

import io
import tarfile


def webdataset_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of samples: each (key, {extension: bytes}) becomes members key.extension, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
