"""A GPU actor decodes a batch on several threads, with the same result as one thread."""

from __future__ import annotations

import threading
import time

import torch

from rayclip import model
from rayclip.stages import embed
from rayclip.store import catalog


def test_a_batch_decoded_on_threads_equals_one_thread(store, monkeypatch):
    threads_seen = set()
    decode = embed.worker.decode_image

    def watched(data: bytes):
        threads_seen.add(threading.get_ident())
        time.sleep(0.02)  # long enough that a pool's threads overlap
        return decode(data)

    monkeypatch.setattr(embed.worker, "decode_image", watched)
    batch = catalog.read_manifest(store, ["media_id", "path"]).slice(0, 12)
    pixels = model.load_model(model.resolve(None, "reference"), threads=1, precision="fp32").pixels

    def decoded(threads: int):
        threads_seen.clear()
        decoder = embed.Decoder(str(store), pixels, threads)
        ids, tensors, failures = decoder(batch.column("media_id").to_pylist(), batch.column("path").to_pylist())
        return ids, tensors, failures, len(threads_seen)

    ids1, tensors1, failures1, used1 = decoded(1)
    ids4, tensors4, failures4, used4 = decoded(4)
    assert used1 == 1 and used4 > 1
    assert ids4 == ids1 and failures4 == failures1 and len(ids1) == 12
    assert tensors1.dtype == torch.uint8 and tensors1.shape == (12, 3, *pixels.size)
    assert torch.equal(tensors1, tensors4)
