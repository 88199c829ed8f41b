"""How a long stage reports progress: a `(done, total)` callback; only the CLI draws it.

Library functions take `progress: Progress | None = None` and never print. Work that runs
elsewhere (img2dataset's processes, Ray's actors) is counted from outside by `watch`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

Progress = Callable[[int, int], None]
POLL_S = 0.5


@contextlib.contextmanager
def watch(count: Callable[[], int], total: int, progress: Progress | None) -> Iterator[None]:
    """Report count() every POLL_S while the block runs, and total once it has finished."""
    if progress is None:
        yield
        return
    progress(0, total)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_S):
            with contextlib.suppress(Exception):  # a count that fails once (a file moving) is retried
                progress(min(count(), total), total)

    thread = threading.Thread(target=poll, name="rayclip-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress(total, total)
