"""Named fault points: `kill -9` at an exact place in a commit protocol, for the tests that prove it.

`point(name)` does nothing unless `$RAYCLIP_KILL_AT` names it; then it SIGKILLs the current process
at once (no cleanup handler, no flush), exactly as an OOM killer or a lost node would.
`$RAYCLIP_KILL_AT=name:N` kills the Nth time this process reaches the point instead of the first (a
shard ingest killed at its second shard's commit, with the first shard committed). The check is a
single environment lookup, so the points stay in production code at no measurable cost.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

KILL_AT_ENV = "RAYCLIP_KILL_AT"

_reached: Counter = Counter()  # times this process reached each point named in $RAYCLIP_KILL_AT
_lock = threading.Lock()  # some points are reached from a pool of threads


def point(name: str) -> None:
    """SIGKILL this process when `$RAYCLIP_KILL_AT` is `name` (or `name:N`, the Nth time); a no-op otherwise."""
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted or wanted.partition(":")[0] != name:
        return
    with _lock:
        _reached[name] += 1
        if _reached[name] == int(wanted.partition(":")[2] or 1):
            os.kill(os.getpid(), signal.SIGKILL)
