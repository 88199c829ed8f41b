"""rayclip: img2dataset ingest → CLIP embeddings on Ray Data → FAISS search (CLI, Python API, HTTP)."""

__version__ = "0.1.0"
__all__ = ["Searcher", "SearchResult", "UserError"]


def __getattr__(name: str):
    # Lazy, so that `import rayclip` (and `rayclip --help`) stays light.
    if name in ("Searcher", "SearchResult"):
        from . import search

        return getattr(search, name)
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(name)
