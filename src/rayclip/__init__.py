"""rayclip: img2dataset ingest → CLIP embeddings on Ray Data → FAISS search (CLI, Python API, HTTP)."""

__version__ = "0.1.0"
__all__ = [
    "Hooks",
    "ModelSpec",
    "QueryService",
    "SearchOptions",
    "Searcher",
    "SearchResult",
    "SearchResults",
    "Term",
    "UserError",
    "data_root",
    "evaluate_benchmark",
    "evaluate_metadata",
    "run_demo",
]

# Lazy, so that `import rayclip` (and `rayclip --help`) stays light: name -> the module that holds it.
_EXPORTS = {
    "Searcher": "query.searcher",
    "SearchResult": "query.searcher",
    "SearchResults": "query.searcher",
    "Term": "query.searcher",
    "QueryService": "query.service",
    "SearchOptions": "options",
    "UserError": "errors",
    "data_root": "store.storage",
    "ModelSpec": "model",
    "Hooks": "pipeline",
    "run_demo": "pipeline",
    "evaluate_metadata": "pipeline",
    "evaluate_benchmark": "pipeline",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
