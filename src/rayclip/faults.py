"""Named fault points: `kill -9` at an exact place in a commit protocol, for the tests that prove it.

`point(name)` does nothing unless `$RAYCLIP_KILL_AT` names it; then it SIGKILLs the current process
at once (no cleanup handler, no flush), exactly as an OOM killer or a lost node would. The check is a
single environment lookup, so the points stay in production code at no measurable cost.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "RAYCLIP_KILL_AT"


def point(name: str) -> None:
    """SIGKILL this process when `$RAYCLIP_KILL_AT == name`; a no-op otherwise."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
