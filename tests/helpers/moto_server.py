"""moto's S3 server for the tests, on loopback, with two of its per-request costs taken out (each
request of a run goes through it: the suite makes tens of thousands). What it answers is unchanged."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone


def start():
    """A started ThreadedMotoServer on 127.0.0.1 (a free port: get_host_and_port says which)."""
    import moto.backends
    import moto.core.serialize
    from moto.server import ThreadedMotoServer

    # It lists its own package folder (a stat per service) on every request to find the service; the
    # folder does not change while it runs.
    services = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: services
    # It reads back each key's ISO timestamp with botocore's general parser (dateutil's) to write it
    # into the answer: a fifth of a listing's CPU. Python's own ISO parser reads the same strings.
    general = moto.core.serialize.parse_to_aware_datetime

    def parse(value):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(value)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        return general(value)

    moto.core.serialize.parse_to_aware_datetime = parse
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server
