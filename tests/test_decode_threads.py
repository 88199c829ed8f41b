"""A GPU actor decodes a batch on several threads, with the same result as one thread."""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from rayclip import model
from rayclip.stages import embed
from rayclip.store import catalog


def test_a_batch_decoded_on_threads_equals_one_thread(store, ray_session, monkeypatch):
    threads_seen = set()
    decode = embed.decode_image

    def watched(data: bytes):
        threads_seen.add(threading.get_ident())
        time.sleep(0.02)  # long enough that a pool's threads overlap
        return decode(data)

    monkeypatch.setattr(embed, "decode_image", watched)
    batch = catalog.read_manifest(store, ["media_id", "path"]).slice(0, 12)
    spec = dataclasses.asdict(model.resolve(None, "reference"))

    def pixels(decode_threads: int):
        threads_seen.clear()
        udf = embed.EmbedUDF(spec, str(store), 1, decode_threads, "cpu", "fp32", stats=None)
        ids, tensors, failures = udf._pixels(batch)
        return ids, tensors, failures, len(threads_seen)

    ids1, tensors1, failures1, used1 = pixels(1)
    ids4, tensors4, failures4, used4 = pixels(4)
    assert used1 == 1 and used4 > 1
    assert ids4 == ids1 and failures4 == failures1 and len(ids1) == 12
    assert all(torch.equal(a, b) for a, b in zip(tensors1, tensors4))
