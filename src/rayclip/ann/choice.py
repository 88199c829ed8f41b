"""Which FAISS index fits N vectors in a memory budget: auto's families and thresholds, the bytes each
type takes, which types merge from parts, and what to say when a build misses its recall target."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .tuning import Tuning

FLAT = "flat"  # IndexFlatIP: exact
ID_BYTES = 8  # an inverted list stores each vector's int64 id next to its code
# --index-type auto: below FLAT_BELOW vectors exact search is fast enough and worth its exactness;
# below HNSW_BELOW an HNSW graph over the full vectors, when it fits the memory budget; above,
# an IVF index with product-quantised codes (autofaiss's families, picked by the same arithmetic).
FLAT_BELOW = 100_000
HNSW_BELOW = 1_000_000
HNSW_LINKS = 32
MAX_NLIST = 8192  # k-means over more lists costs more CPU time than a 2-core build can spend
_FAST_SCAN = re.compile(r"PQ\d+(x4)?fs")  # fast-scan PQ codes (PQ32x4fs, PQ32fs)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'4G', '512M', '1.5g', '2GiB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--max-index-memory {text!r} is not a size; write e.g. 4G, 512M or 2000000000")
    number, unit = match.groups()
    return int(float(number) * (1024 ** ("kmgt".index(unit.lower()) + 1) if unit else 1))


def nlist_for(count: int, max_nlist: int) -> int:
    """Inverted lists: 4·√N rounded to a power of two (autofaiss's rule of thumb), capped."""
    return int(min(max_nlist, max(16, 2 ** round(math.log2(4 * math.sqrt(max(count, 1)))))))


def index_bytes(index_type: str, count: int, dim: int) -> int:
    """Estimated in-memory bytes of an index_factory string this module chooses."""
    if index_type == FLAT:
        return count * dim * 4
    if index_type.startswith("HNSW"):
        links = int(index_type[4:])
        return count * (dim * 4 + links * 2 * 4 + 16)
    nlist = int(re.search(r"IVF(\d+)", index_type).group(1))
    # every code a vector has: IVF codes (SQ or PQ) and, behind Refine(...), the re-ranking codes
    scalar = sum(dim * int(bits) // 8 for bits in re.findall(r"SQ(\d+)", index_type))
    product = sum(int(m) * int(bits) // 8 for m, bits in re.findall(r"PQ(\d+)x(\d+)", index_type))
    centroids = nlist * dim * 4 * (2 if "_HNSW" in index_type else 1)  # twice with an HNSW graph over them
    return count * (scalar + product + ID_BYTES) + centroids


def mergeable(index_type: str) -> bool:
    """Whether indexes of this type built from parts (on one trained quantizer) can be merged, in RAM or
    on disk, and memory-mapped: IVF with plain inverted lists. Not flat or HNSW (no lists: a graph cannot
    be merged), not fast-scan codes (packed in blocks: FAISS's merge corrupts them) nor Refine(...)
    (its re-ranking codes sit outside the lists)."""
    return "IVF" in index_type and not _FAST_SCAN.search(index_type) and ",Refine(" not in index_type


def choose_index_type(count: int, dim: int, max_bytes: int, merge: bool = False) -> str:
    """Flat, then HNSW, then an IVF index whose codes take the most bytes
    that fit both the budget and a quarter of the flat index.

    First choice: 4-bit fast-scan PQ codes (dim/8 bytes, else dim/16), scanned from SIMD
    registers, find a shortlist of REFINE_K_FACTOR·k that 6-bit scalar codes of the whole vector
    re-rank. Short codes scan fast, so probing many lists costs little, and the re-ranking codes
    decide the recall (8-bit ones would not fit a quarter of flat's bytes next to the PQ codes and
    ids; 4-bit ones rank too coarsely). Where ids weigh too much for both (small dim), 6-bit codes
    of each vector's residual to its list alone. Then, for tight budgets, OPQ-rotated PQ.
    With `merge`, only types that can be built in parts and merged (`mergeable`)."""
    if count < FLAT_BELOW and index_bytes(FLAT, count, dim) <= max_bytes and not merge:
        return FLAT
    hnsw = f"HNSW{HNSW_LINKS}"
    if count < HNSW_BELOW and index_bytes(hnsw, count, dim) <= max_bytes and not merge:
        return hnsw
    nlist = nlist_for(count, MAX_NLIST)
    # Lists are found by brute force over the centroids: at most MAX_NLIST·dim multiply-adds, cheaper
    # than an HNSW walk over them at the efSearch that probing hundreds of lists needs.
    ivf = f"IVF{nlist}"
    candidates = (
        [f"{ivf},PQ{m}x4fs,Refine(SQ6)" for m in (dim // 4, dim // 8)]
        + [f"{ivf},SQ6"]
        + [f"OPQ{code}_{dim},{ivf},PQ{code}x8" for code in (dim // 4, dim // 8, dim // 16) if code >= 4]
    )
    for candidate in (c for c in candidates if mergeable(c) or not merge):
        per_vector = index_bytes(candidate, 1, dim) - index_bytes(candidate, 0, dim)  # codes + id
        if per_vector <= dim and index_bytes(candidate, count, dim) <= max_bytes:  # dim bytes: ¼ of flat's
            return candidate
    smallest = index_bytes(candidates[-1], count, dim)
    raise UserError(
        f"{count} vectors of {dim} dimensions need at least {smallest / 2**20:.0f} MiB; raise --max-index-memory"
    )


def fallback_for(index_type: str) -> str | None:
    """What auto builds instead when a refined index misses the recall target: 6-bit codes of
    each vector's residual to its list, on the same lists. Residuals span a smaller range than
    whole vectors, so these codes rank more precisely (tight clusters need it); they scan slower."""
    return index_type.split(",")[0] + ",SQ6" if ",Refine(" in index_type else None


def shortfall(
    tuning: Tuning,
    index_type: str,
    auto_picked: bool,
    count: int,
    dim: int,
    max_bytes: int,
    merge: bool = False,
    servers: int = 1,
) -> str:
    """Empty when the build met its recall target; else which index missed it by how much, and what
    would reach it where something would. `auto_picked`: auto chose index_type within `max_bytes` per
    server (`servers` shards share the index); `merge`: the build's form (on disk, in shards, from
    parts) admits only types that merge, so neither flat nor HNSW can be suggested."""
    if tuning.target_met:
        return ""
    missed = f"{index_type} recall@{tuning.k} {tuning.recall_at_k:.3f} is below the target {tuning.target}"
    if auto_picked:
        remedy = _remedy(index_type, count, dim, max_bytes, merge, servers)
    else:
        remedy = "pick another --index-type" + ("" if merge else " (flat is exact)")
    return f"{missed}; {remedy}" if remedy else missed


def _remedy(index_type: str, count: int, dim: int, max_bytes: int, merge: bool, servers: int) -> str:
    """Auto's pick grows with the budget, up to the one it picks with no limit (among the types
    that merge, where the build's form needs them): only the budget kept it from that one, so more
    memory helps unless auto built it (or measured and rejected it, refined), or the budget it needs
    is no more than the one allowed (a build on disk keeps its lists out of memory: auto picked
    as if unlimited). Then nothing auto would build does better (flat is exact, but auto spares
    this many vectors the time of exhaustive search)."""
    unlimited = choose_index_type(count, dim, 1 << 62, merge)
    needed = math.ceil(index_bytes(unlimited, count, dim) / servers)  # each server holds its shard
    if index_type in (unlimited, fallback_for(unlimited)) or needed <= max_bytes:
        return ""
    return f"allow more memory: --max-index-memory {math.ceil(needed / 2**20)}M lets auto pick {unlimited}"
