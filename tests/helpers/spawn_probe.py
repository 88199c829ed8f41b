"""Run in a process that multiprocessing's spawn started, as img2dataset's are (test_ingest.py)."""

import sys


def torch_after_img2dataset() -> bool:
    """Whether torch is loaded once this process has imported what img2dataset's processes import first."""
    import img2dataset.downloader  # noqa: F401 - the import is the probe

    return sys.modules.get("torch") is not None
