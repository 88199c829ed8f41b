"""Run in a process that multiprocessing's spawn started, as img2dataset's are (test_ingest.py)."""

import sys


def import_img2dataset() -> dict[str, bool]:
    """What a spawned img2dataset process imports first, then which of it is loaded here."""
    import img2dataset.downloader  # noqa: F401 - the import is the probe

    return {"img2dataset": "img2dataset.downloader" in sys.modules, "torch": sys.modules.get("torch") is not None}
