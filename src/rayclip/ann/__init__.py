"""Approximate indexes: which FAISS index fits N vectors in a memory budget (`choice`), what its
query-time knobs (nprobe, efSearch) must be to reach a recall target (`knobs`, `tuning`), and how
good it then is.

Recall is always measured against exact search: a build keeps TUNING_QUERIES held-out vectors
and their exact neighbours (`Truth`), computed while its vectors stream past, so measuring is a
batch of ANN searches, never a second exact pass. The chosen knobs travel in build.json and the
Searcher applies them (`apply_parameters`, `search_parameters` for filtered searches).

Both index builds (stages/index/) and the query floor use this package, so it sits below both;
callers use the names below.
"""

from .choice import (
    FLAT,
    choose_index_type,
    fallback_for,
    index_bytes,
    mergeable,
    nlist_for,
    parse_bytes,
    shortfall,
)
from .codes import replace_vectors, replaceable
from .knobs import apply_parameters, candidate_parameters, nlist_of, search_parameters
from .tuning import TIE_TOLERANCE, Truth, Tuning, exact, latency, recall, tune

__all__ = [
    "FLAT",
    "TIE_TOLERANCE",
    "Truth",
    "Tuning",
    "apply_parameters",
    "candidate_parameters",
    "choose_index_type",
    "exact",
    "fallback_for",
    "index_bytes",
    "latency",
    "mergeable",
    "nlist_for",
    "nlist_of",
    "parse_bytes",
    "recall",
    "replace_vectors",
    "replaceable",
    "search_parameters",
    "shortfall",
    "tune",
]
