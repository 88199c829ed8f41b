"""The main module of img2dataset's spawned processes: download.py names it while img2dataset runs.

multiprocessing's spawn runs the parent's main module first in every process it starts, before the
work it hands over. img2dataset imports webdataset, which imports torch only for its optional
PyTorch classes (it has stand-ins for when torch is absent), and img2dataset never uses them: so
img2dataset's processes start without torch, in less time and memory (docs/benchmarks.md,
bench_ingest.py)."""

import sys

if __name__ == "__mp_main__":  # run first in a spawned process; imported in the parent, it does nothing
    sys.modules.setdefault("torch", None)  # `import torch` raises ModuleNotFoundError: webdataset's stand-ins
