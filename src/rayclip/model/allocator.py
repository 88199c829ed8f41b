"""glibc's allocator held to the memory a model frees, in a process that encodes batch after batch.

Each batch allocates and frees the same large activations. By default glibc maps a block over its
mmap threshold (at most 32 MiB) on its own and gives it back to the kernel when it is freed, and
trims the free top of its heaps the same way, so the next batch takes every page again as a page
fault (an embed actor encodes on Ray Data's call threads: 48,000-69,000 faults per 384 images of
ViT-B-32 on one; docs/benchmarks.md). Held, the freed blocks are reused.
"""

from __future__ import annotations

import ctypes
import os

# Up to this much freed memory stays with the process for its next batch (a model's activations
# at any batch it runs are well under it); what it never uses again is the same as before.
HELD_BYTES = 1 << 30
# mallopt's options, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def hold_freed_memory() -> bool:
    """Keep freed memory in this process: blocks under HELD_BYTES come from glibc's heaps (a thread's
    own heap grows to 64 MiB; larger blocks are still mapped on their own) and stay there once freed.
    Whether it took effect: False where the C library is not glibc (macOS, musl)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (ValueError, OSError):  # no such confstr name, or no glibc to load
        return False
    settings = ((_M_MMAP_THRESHOLD, HELD_BYTES), (_M_TRIM_THRESHOLD, HELD_BYTES))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
