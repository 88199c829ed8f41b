"""Chains of stages for the CLI and the Python API: `runner.py`, the wrapper every stage runs in
(log capture, `Hooks`); `embedding.py`, `rayclip embed`'s image and caption stages; `evaluation.py`,
eval through the whole pipeline; `demo.py`, the demo. Nothing here prints: the CLI's hooks draw
what the user sees. Callers use the names below.
"""

from .demo import DEMO_PORT, DEMO_SAMPLE_QUERIES, DemoRun, DemoSite, run_demo, serve_demo_site
from .embedding import embed_command, embed_silver
from .evaluation import EvalRun, evaluate_benchmark, evaluate_metadata
from .runner import QUIET, Hooks, RayDashboard, Stage, run_stage, stage, start_ray

__all__ = [
    "DEMO_PORT",
    "DEMO_SAMPLE_QUERIES",
    "QUIET",
    "DemoRun",
    "DemoSite",
    "EvalRun",
    "Hooks",
    "RayDashboard",
    "Stage",
    "embed_command",
    "embed_silver",
    "evaluate_benchmark",
    "evaluate_metadata",
    "run_demo",
    "run_stage",
    "serve_demo_site",
    "stage",
    "start_ray",
]
