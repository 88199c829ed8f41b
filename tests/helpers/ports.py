"""A free TCP port on loopback, for a server a test starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10_002, 20_000)  # Ray's min_worker_port and max_worker_port defaults
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux's; 32768-60999 by default


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick; another process could take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lasting_port() -> int:
    """A free port for a server that starts long after its port is named (an endpoint set in the
    environment when the session starts): outside the kernel's ephemeral range, which any outgoing
    connection may take as its own port meanwhile, and outside the ports Ray gives its workers."""
    first_ephemeral = int(EPHEMERAL.read_text().split()[0]) if EPHEMERAL.exists() else 32_768
    candidates = list(range(RAY_WORKER_PORTS.stop, first_ephemeral))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()
