"""The floors hold: only src/rayclip/store/ touches a filesystem, and stages never import each other.

Read from the source (AST), nothing run. A filesystem use outside the store floor is one of the
honest exceptions below, each named with why; anything else is a leak (route it through storage).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rayclip

PACKAGE = Path(rayclip.__file__).parent
STORE = "store"

# Calls and imports that touch a filesystem directly (the storage floor's business).
FORBIDDEN_CALLS = {"open", "os.rename", "os.replace", "os.symlink", "os.remove", "os.unlink", "os.makedirs", "os.mkdir"}
FORBIDDEN_IMPORTS = {"shutil", "glob", "tempfile", "fsspec", "upath", "s3fs", "pyarrow.fs"}
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
}

# The honest exceptions: (module under src/rayclip, what it uses) -> why. None of them is a data-root
# path: each reads a file the user names or the package ships, or writes a local scratch folder.
ALLOWED = {
    ("model/names.py", "open()"): "hashes a checkpoint file (the packaged reference weights or --pretrained PATH)",
    ("model/precision.py", "open()"): "reads /proc/cpuinfo for the CPU's features",
    ("synthetic.py", ".mkdir"): "creates the local folder of generated demo/training images it then serves",
    ("synthetic.py", ".write_bytes"): "writes the generated JPEGs into that folder",
    ("synthetic.py", ".write_text"): "writes the generated annotation files (COCO/Flickr JSON) beside them",
    ("http/app.py", ".read_text"): "serves the web page's static files, packaged with rayclip",
    ("pipeline/embedding.py", ".read_text"): "reads Linux's /proc/self/stat and /proc/uptime: when the process began",
    ("images.py", ".read_bytes"): "reads a query image the user names (--image FILE)",
    ("eval/recall.py", ".read_text"): "reads the benchmark's annotation file the user names",
    ("eval/recall.py", ".read_bytes"): "hashes the benchmark's local image files",
}

# Stage modules never import each other. What two stages (or a stage and the query floor) share lives
# on a floor below them (rayclip/ann.py, cluster.py, options.py).
STAGES = PACKAGE / "stages"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != STORE)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def filesystem_uses(source: str) -> set[str]:
    """What a module's source does to a filesystem without storage: 'open()', 'os.symlink()',
    'import shutil', '.read_bytes', …"""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {f"import {a.name}" for a in node.names if a.name in FORBIDDEN_IMPORTS}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in FORBIDDEN_IMPORTS:
            found.add(f"import {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.add(f"{name}()")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
                if _dotted(node.func.value) != "storage":
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


def test_the_check_sees_what_it_looks_for():
    source = """
import shutil, os
from glob import glob
def f(p, storage):
    open(p)
    os.replace(p, p)
    p.write_bytes(b"")
    storage.glob(p, "*")
"""
    assert filesystem_uses(source) == {"import shutil", "import glob", "open()", "os.replace()", ".write_bytes"}


def _stage_of(path: Path) -> str:
    """The stage a module belongs to: a module under stages/, or a package there (its modules are one stage)."""
    return path.relative_to(STAGES).parts[0].removesuffix(".py")


def _stage_imports(path: Path) -> set[str]:
    """The other stages a stage's module imports (relative imports resolved against its own package,
    or rayclip.stages.x)."""
    found = set()
    package = list(path.relative_to(PACKAGE).parent.parts)  # where a level-1 import starts: ["stages", ...]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("rayclip."):
                base = node.module.split(".")[1:]
            else:
                continue
            targets = [base] if len(base) > 1 else [base + [a.name] for a in node.names]
            found |= {t[1] for t in targets if t[0] == "stages" and len(t) > 1}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("rayclip.stages.")}
    return found - {_stage_of(path)}


def test_stages_never_import_each_other():
    crossings = {}
    for path in sorted(STAGES.rglob("*.py")):
        if path.parent == STAGES and path.stem == "__init__":
            continue
        imported = _stage_imports(path)
        if imported:
            crossings[path.relative_to(STAGES).as_posix()] = sorted(imported)
    assert crossings == {}
