"""glibc's allocator held to the memory a model frees, in a process that encodes batch after batch.

Each batch allocates and frees the same large activations. By default glibc maps a block over its
mmap threshold (at most 32 MiB) on its own and gives it back to the kernel when it is freed, and
trims the free top of its heaps the same way, so the next batch takes every page again as a page
fault (tens of thousands per batch of ViT-B-32 on an embed actor's call thread; docs/benchmarks.md,
part (m)). Held, the freed blocks are reused.
"""

from __future__ import annotations

import ctypes
import os

# Blocks up to this size come from glibc's heaps, and up to this much of a heap's free top stays with
# it (a model's activations at any batch it runs are well under it). The setting is the whole
# process's: Ray's own threads keep what they free too, and the process's memory no longer falls
# back between batches.
HELD_BYTES = 1 << 30
# mallopt's options, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def hold_freed_memory() -> bool:
    """Keep freed memory in this process: blocks under HELD_BYTES come from glibc's heaps (a thread's
    own heap grows to 64 MiB; larger blocks are still mapped on their own) and stay there once freed.
    Whether both settings took effect: False where the C library is not glibc (macOS, musl,
    Windows), and where an old glibc refuses a threshold over 32 MiB (it still takes the other)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name, no glibc to load
        return False
    taken = [libc.mallopt(option, HELD_BYTES) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return all(taken)
