"""The floors hold: only src/rayclip/store/ touches a filesystem, stages never import each other, and
no test module imports conftest or another test module.

Read from the source (AST), nothing run. A filesystem use outside the store floor is one of the
honest exceptions below, each named with why; anything else is a leak (route it through storage).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rayclip

PACKAGE = Path(rayclip.__file__).parent
STORE = "store"
TESTS = Path(__file__).resolve().parents[1]

# Calls and imports that touch a filesystem directly (the storage floor's business), by their full
# name: `from os import replace` and `import os as o` are seen as os.replace too.
FORBIDDEN_CALLS = {
    "open",
    "os.rename",
    "os.replace",
    "os.symlink",
    "os.remove",
    "os.unlink",
    "os.makedirs",
    "os.mkdir",
    "os.listdir",
    "os.scandir",
    "os.walk",
    "os.stat",
    "os.path.exists",
    "os.path.isfile",
    "os.path.isdir",
    "os.path.getsize",
}
FORBIDDEN_IMPORTS = {"shutil", "glob", "tempfile", "fsspec", "upath", "s3fs", "pyarrow.fs"}
# Library calls that open a path themselves when given one (the argument at this position, or by
# this keyword), instead of a file object storage opened: fine with a handle bound by
# `with storage.open_input/open_output(...) as f`, or with the filesystem storage hands out.
PATH_TAKING = {
    "pyarrow.parquet.write_table": (1, "where"),
    "pyarrow.parquet.read_table": (0, "source"),
    "pyarrow.parquet.ParquetWriter": (0, "where"),
    "numpy.save": (0, "file"),
    "numpy.savez": (0, "file"),
    "numpy.savez_compressed": (0, "file"),
    "numpy.savetxt": (0, "fname"),
    "numpy.load": (0, "file"),
    "faiss.write_index": (1, None),
    "faiss.read_index": (0, None),
}
# pathlib's own I/O, on whatever path object (storage.<name>(…) is the floor's API and is fine).
FORBIDDEN_METHODS = {
    "glob",
    "rglob",
    "iterdir",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "mkdir",
    "unlink",
    "rmdir",
    "touch",
    "symlink_to",
    "rename",
    "open",
    "exists",
    "stat",
    "is_file",
    "is_dir",
}
# Receivers whose .open is not a path's: PIL and tarfile on a file object, rayclip's Searcher.
NOT_PATHS = {"storage", "Image", "tarfile", "Searcher"}

# The honest exceptions: (module under src/rayclip, what it uses) -> why. None of them is a data-root
# path: each reads a file the user names or the package ships, or writes a local scratch folder.
ALLOWED = {
    ("model/names.py", "open()"): "hashes a checkpoint file (the packaged reference weights or --pretrained PATH)",
    ("model/precision.py", "open()"): "reads /proc/cpuinfo for the CPU's features",
    ("model/names.py", ".is_file"): "checks that the checkpoint file the user names (or the packaged one) is there",
    ("model/names.py", ".exists"): "tells a checkpoint path the user names from a model name",
    ("synthetic.py", ".mkdir"): "creates the local folder of generated demo/training images it then serves",
    ("synthetic.py", ".write_bytes"): "writes the generated JPEGs into that folder",
    ("synthetic.py", ".write_text"): "writes the generated annotation files (COCO/Flickr JSON) beside them",
    ("synthetic.py", "pyarrow.parquet.write_table()"): "writes the generated captions and metadata beside them",
    ("http/app.py", ".read_text"): "serves the web page's static files, packaged with rayclip",
    ("pipeline/embedding.py", ".read_text"): "reads Linux's /proc/self/stat and /proc/uptime: when the process began",
    ("images.py", ".read_bytes"): "reads a query image the user names (--image FILE)",
    ("eval/annotations.py", ".read_text"): "reads the benchmark's annotation file the user names",
    ("eval/recall.py", ".read_bytes"): "hashes the benchmark's local image files",
    ("eval/annotations.py", ".is_file"): "checks the benchmark's local annotation and image files",
    ("eval/annotations.py", ".is_dir"): "checks the benchmark's local image folder",
    ("ann/tuning.py", "numpy.savez()"): "Truth.save writes into the file object its caller opened with storage",
    ("ann/tuning.py", "numpy.load()"): "Truth.load reads from the file object its caller opened with storage",
}

# Stage modules never import each other. What two stages (or a stage and the query floor) share lives
# on a floor below them (rayclip/ann/, cluster.py, options.py).
STAGES = PACKAGE / "stages"
# Modules above the stages that import every stage: a stage importing one imports the others.
OVER_THE_STAGES = {"pipeline", "cli"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != STORE)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _full_names(tree: ast.AST) -> dict[str, str]:
    """What each name a module binds by import stands for: {"pq": "pyarrow.parquet", "replace": "os.replace"}."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname: a.name for a in node.names if a.asname}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    return names


def _storage_handles(tree: ast.AST) -> set[str]:
    """Names bound to a file object or filesystem storage opened: `with storage.x(...) as f`,
    `f = stack.enter_context(storage.x(...))`, `fs, where = storage.arrow(...)`, or an io.BytesIO."""

    def from_storage(value: ast.AST) -> bool:
        return any(
            isinstance(n, ast.Call) and _dotted(n.func).split(".")[0] in ("storage", "io") for n in ast.walk(value)
        )

    handles = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.withitem) and node.optional_vars is not None and from_storage(node.context_expr):
            handles |= {n.id for n in ast.walk(node.optional_vars) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Assign) and from_storage(node.value):
            handles |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return handles


def _path_argument(call: ast.Call, position: int, keyword: str | None) -> ast.AST | None:
    if len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def filesystem_uses(source: str) -> set[str]:
    """What a module's source does to a filesystem without storage: 'open()', 'os.symlink()',
    'import shutil', '.read_bytes', 'numpy.save()', …"""
    tree = ast.parse(source)
    names, handles = _full_names(tree), _storage_handles(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {f"import {a.name}" for a in node.names if a.name in FORBIDDEN_IMPORTS}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in FORBIDDEN_IMPORTS:
            found.add(f"import {node.module}")
        elif isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            first, _, rest = dotted.partition(".")
            name = ".".join(filter(None, [names.get(first, first), rest]))
            if name in FORBIDDEN_CALLS:
                found.add(f"{name}()")
            elif name in PATH_TAKING:
                where = _path_argument(node, *PATH_TAKING[name])
                given_fs = any(k.arg == "filesystem" for k in node.keywords)
                if not given_fs and not (isinstance(where, ast.Name) and where.id in handles):
                    found.add(f"{name}()")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
                receiver = _dotted(node.func.value)
                if receiver not in NOT_PATHS and not (node.func.attr == "open" and receiver[:1].isupper()):
                    found.add(f".{node.func.attr}")
    return found


def test_only_the_store_floor_touches_a_filesystem():
    leaks = []
    for path in _modules():
        module = path.relative_to(PACKAGE).as_posix()
        for use in sorted(filesystem_uses(path.read_text(encoding="utf-8"))):
            if (module, use) not in ALLOWED:
                leaks.append(f"{module}: {use}")
    assert leaks == [], "filesystem use outside src/rayclip/store/ (go through storage, or allow it with why)"


LEAKS = {
    "open": ("def f(p):\n    open(p)", "open()"),
    "os.replace": ("import os\ndef f(p):\n    os.replace(p, p)", "os.replace()"),
    "from os import replace": ("from os import replace\ndef f(p):\n    replace(p, p)", "os.replace()"),
    "os as an alias": ("import os as o\ndef f(p):\n    o.listdir(p)", "os.listdir()"),
    "os.listdir": ("import os\ndef f(p):\n    os.listdir(p)", "os.listdir()"),
    "os.walk": ("import os\ndef f(p):\n    os.walk(p)", "os.walk()"),
    "os.path.exists": ("import os\ndef f(p):\n    os.path.exists(p)", "os.path.exists()"),
    "import shutil": ("import shutil", "import shutil"),
    "from glob import glob": ("from glob import glob", "import glob"),
    "Path.write_bytes": ("def f(p):\n    p.write_bytes(b'')", ".write_bytes"),
    "Path.open": ("def f(p):\n    with p.open('wb') as out:\n        out.write(b'')", ".open"),
    "Path.exists": ("def f(p):\n    return p.exists()", ".exists"),
    "Path.stat": ("def f(p):\n    return p.stat().st_size", ".stat"),
    "Path.is_file": ("def f(p):\n    return p.is_file()", ".is_file"),
    "pq.write_table(path)": (
        "import pyarrow.parquet as pq\ndef f(t, p):\n    pq.write_table(t, p / 'x.parquet')",
        "pyarrow.parquet.write_table()",
    ),
    "pq.write_table(where=path)": (
        "from pyarrow import parquet as pq\ndef f(t, p):\n    pq.write_table(t, where=p)",
        "pyarrow.parquet.write_table()",
    ),
    "pq.read_table(path)": (
        "import pyarrow.parquet as pq\ndef f(p):\n    pq.read_table(p)",
        "pyarrow.parquet.read_table()",
    ),
    "np.save(path)": ("import numpy as np\ndef f(a, p):\n    np.save(p, a)", "numpy.save()"),
    "np.savez(path)": ("import numpy as np\ndef f(a, p):\n    np.savez(p, a=a)", "numpy.savez()"),
    "faiss.write_index(path)": ("import faiss\ndef f(i, p):\n    faiss.write_index(i, str(p))", "faiss.write_index()"),
    "faiss.read_index(path)": ("def f(p):\n    import faiss\n    faiss.read_index(str(p))", "faiss.read_index()"),
}


@pytest.mark.parametrize("kind", LEAKS)
def test_the_check_sees_each_kind_of_leak(kind):
    source, finding = LEAKS[kind]
    assert filesystem_uses(source) == {finding}


def test_the_check_lets_through_what_goes_through_storage():
    source = """
import io
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
def f(root, table, index, storage, catalog):
    storage.glob(root, "*")
    storage.exists(root)
    with storage.open_output(root / "x.parquet") as out:
        pq.write_table(table, out)
        np.save(out, table)
    fs, where = storage.arrow(root)
    pq.read_table(where, filesystem=fs)
    buffer = io.BytesIO()
    np.savez(buffer, a=table)
    catalog.write_index(root / "i.faiss", index)
    Image.open(buffer)
"""
    assert filesystem_uses(source) == set()


def _stage_of(path: Path) -> str:
    """The stage a module belongs to: a module under stages/, or a package there (its modules are one stage)."""
    return path.relative_to(STAGES).parts[0].removesuffix(".py")


def stage_imports(source: str, package: list[str]) -> set[str]:
    """The stages a module in `package` (["stages", ...]) imports: relative imports resolved against
    it, rayclip.stages.x, importlib.import_module or __import__ of one by name, and "pipeline" (or
    "cli") for a module above the stages, which imports every stage."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("rayclip"):
                base = node.module.split(".")[1:]
            else:
                continue
            targets = [base] if base else [[a.name] for a in node.names]
            targets = [t if len(t) > 1 or t[0] != "stages" else t + [a.name] for t in targets for a in node.names]
            found |= {t[1] for t in targets if t[0] == "stages" and len(t) > 1}
            found |= {t[0] for t in targets if t[0] in OVER_THE_STAGES}
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[:2] == ["rayclip", "stages"] and len(parts) > 2:
                    found.add(parts[2])
                elif parts[0] == "rayclip" and len(parts) > 1 and parts[1] in OVER_THE_STAGES:
                    found.add(parts[1])
        elif isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("import_module", "__import__"):
            named = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
            parts = str(named).lstrip(".").split(".")
            if "stages" in parts[:-1]:
                found.add(parts[parts.index("stages") + 1])
            elif parts[-1] in OVER_THE_STAGES:
                found.add(parts[-1])
    return found


def _stage_imports(path: Path) -> set[str]:
    package = list(path.relative_to(PACKAGE).parent.parts)  # where a level-1 import starts: ["stages", ...]
    return stage_imports(path.read_text(encoding="utf-8"), package) - {_stage_of(path)}


def test_stages_never_import_each_other():
    crossings = {}
    for path in sorted(STAGES.rglob("*.py")):
        if path.parent == STAGES and path.stem == "__init__":
            continue
        imported = _stage_imports(path)
        if imported:
            crossings[path.relative_to(STAGES).as_posix()] = sorted(imported)
    assert crossings == {}


CROSSINGS = {
    "from .. import embed": ("from .. import embed", {"embed"}),
    "from ..embed import x": ("from ..embed import plan", {"embed"}),
    "from rayclip.stages import embed": ("from rayclip.stages import embed", {"embed"}),
    "import rayclip.stages.embed": ("import rayclip.stages.embed", {"embed"}),
    "from rayclip import pipeline": ("from rayclip import pipeline", {"pipeline"}),
    "from ...pipeline import x": ("from ...pipeline import run_stage", {"pipeline"}),
    "import rayclip.pipeline": ("import rayclip.pipeline", {"pipeline"}),
    "importlib": ("import importlib\nimportlib.import_module('rayclip.stages.embed')", {"embed"}),
    "__import__": ("__import__('rayclip.stages.embed')", {"embed"}),
    "importlib of pipeline": ("import importlib\nimportlib.import_module('rayclip.pipeline')", {"pipeline"}),
}


@pytest.mark.parametrize("kind", CROSSINGS)
def test_the_check_sees_each_way_a_stage_imports_another(kind):
    source, stages = CROSSINGS[kind]
    assert stage_imports(source, ["stages", "index"]) == stages  # as read in stages/index/x.py


# Tests import helpers (tests/helpers/), never conftest (its fixtures come by name) or a test module.
def imports_of_tests(source: str) -> set[str]:
    """The modules of tests/ a source imports that a test must not: conftest and test_*."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("import_module", "__import__"):
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        found |= {n for n in names if n.split(".")[-1] == "conftest" or n.split(".")[-1].startswith("test_")}
    return found


def test_no_test_imports_conftest_or_another_test_module():
    found = {}
    for path in sorted(TESTS.rglob("*.py")):
        if imported := imports_of_tests(path.read_text(encoding="utf-8")):
            found[path.relative_to(TESTS).as_posix()] = sorted(imported)
    assert found == {}


@pytest.mark.parametrize(
    "source",
    ["from conftest import cli", "import conftest", "from test_server import a_media", "import test_server as t"],
)
def test_the_check_sees_a_test_importing_conftest_or_a_test(source):
    assert imports_of_tests(source)
