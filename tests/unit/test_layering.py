"""The floors hold: only src/rayclip/store/ touches a filesystem, stages never import each other, no
test module imports conftest or another test module, and each fixture name is defined once and hands
out a named type, not a tuple.

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
    "os.lstat",
    "os.open",
    "os.rmdir",
    "os.removedirs",
    "os.renames",
    "os.link",
    "os.readlink",
    "os.chmod",
    "os.utime",
    "os.truncate",
    "os.access",
    "os.path.exists",
    "os.path.lexists",
    "os.path.isfile",
    "os.path.isdir",
    "os.path.islink",
    "os.path.ismount",
    "os.path.samefile",
    "os.path.getsize",
    "os.path.getmtime",
    "os.path.getatime",
    "os.path.getctime",
}
FORBIDDEN_IMPORTS = {"shutil", "glob", "tempfile", "fsspec", "upath", "s3fs", "pyarrow.fs"}
# Library calls that open a path themselves when given one (the argument at this position, or by
# this keyword), instead of a file object storage opened: fine with a handle (see HANDLE_MAKERS),
# with no path argument at all (`tarfile.open(fileobj=f)`), or with the filesystem storage hands out.
PATH_TAKING = {
    "pyarrow.parquet.write_table": (1, "where"),
    "pyarrow.parquet.read_table": (0, "source"),
    "pyarrow.parquet.ParquetWriter": (0, "where"),
    "pyarrow.parquet.ParquetFile": (0, "source"),
    "pyarrow.parquet.ParquetDataset": (0, "path_or_paths"),
    "pyarrow.parquet.read_metadata": (0, "where"),
    "pyarrow.parquet.read_schema": (0, "where"),
    "pyarrow.parquet.write_to_dataset": (1, "root_path"),
    "pyarrow.memory_map": (0, "path"),
    "pyarrow.create_memory_map": (0, "path"),
    "pyarrow.OSFile": (0, "path"),
    "numpy.save": (0, "file"),
    "numpy.savez": (0, "file"),
    "numpy.savez_compressed": (0, "file"),
    "numpy.savetxt": (0, "fname"),
    "numpy.load": (0, "file"),
    "numpy.loadtxt": (0, "fname"),
    "numpy.memmap": (0, "filename"),
    "numpy.fromfile": (0, "file"),
    "faiss.write_index": (1, None),
    "faiss.read_index": (0, None),
    "tarfile.open": (0, "name"),
    "zipfile.ZipFile": (0, "file"),
    "PIL.Image.open": (0, "fp"),
    "torch.save": (1, "f"),
    "torch.load": (0, "f"),
}
# What makes a file object, the only thing a PATH_TAKING call may be handed instead of a path:
# storage's openers (by their last two name parts, however storage was imported) and io's buffers.
HANDLE_MAKERS = {"storage.open_input", "storage.open_output", "storage.open_append", "io.BytesIO", "io.StringIO"}
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
    "hardlink_to",
    "readlink",
    "chmod",
    "open",
    "exists",
    "stat",
    "lstat",
    "is_file",
    "is_dir",
    "is_symlink",
}
# Path.replace is pathlib's atomic rename. str.replace takes two arguments and datetime.replace
# keywords, so a .replace is a path's when it takes one positional argument, or is called on Path.
PATH_CLASSES = {"pathlib.Path", "pathlib.PurePath", "Path"}
# Receivers whose methods above are not a path's: storage's API, rayclip's Searcher.open.
NOT_PATHS = {"storage", "Searcher"}

# The honest exceptions: (module under src/rayclip, what it uses) -> why. None of them is a data-root
# path: each reads a file the user names or the package ships, or writes a local scratch folder.
ALLOWED = {
    ("model/names.py", "open()"): "hashes a checkpoint file (the packaged reference weights or --pretrained PATH)",
    ("model/precision.py", "open()"): "reads /proc/cpuinfo for the CPU's features",
    ("model/names.py", ".is_file"): "checks that the checkpoint file the user names (or the packaged one) is there",
    ("model/names.py", ".exists"): "tells a checkpoint path the user names from a model name",
    ("model/names.py", ".read_text"): "reads a packaged model config (rayclip's or open_clip's): does it need timm",
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


def _full_name(dotted: str, names: dict[str, str]) -> str:
    """A dotted call name with its first part resolved through the module's imports: np.save -> numpy.save."""
    first, _, rest = dotted.partition(".")
    return ".".join(filter(None, [names.get(first, first), rest]))


def _makes_a_handle(value: ast.AST, names: dict[str, str]) -> bool:
    """Whether an expression is a file object: a HANDLE_MAKERS call, or one entered on an ExitStack."""
    if not isinstance(value, ast.Call):
        return False
    name = _full_name(_dotted(value.func), names)
    if name.split(".")[-1] == "enter_context":
        return any(_makes_a_handle(a, names) for a in value.args[:1])
    return ".".join(name.split(".")[-2:]) in HANDLE_MAKERS


def _storage_handles(tree: ast.AST, names: dict[str, str]) -> set[str]:
    """Names bound to a file object: `with storage.open_input(...) as f`, `f = io.BytesIO()`,
    `f = stack.enter_context(storage.open_output(...))`. Not a path storage returns (storage.uri,
    storage.arrow's path, storage.working's folder): a library handed one opens it itself."""
    handles = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            if _makes_a_handle(node.context_expr, names):
                handles.add(node.optional_vars.id)
        elif isinstance(node, ast.Assign) and _makes_a_handle(node.value, names):
            handles |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return handles


def _path_argument(call: ast.Call, position: int, keyword: str | None) -> ast.AST | None:
    if len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def _opens_a_path(call: ast.Call, name: str, names: dict[str, str], handles: set[str]) -> bool:
    """Whether a PATH_TAKING call is handed a path rather than a file object or storage's filesystem."""
    where = _path_argument(call, *PATH_TAKING[name])
    if where is None or any(k.arg == "filesystem" for k in call.keywords):
        return False
    return not ((isinstance(where, ast.Name) and where.id in handles) or _makes_a_handle(where, names))


def _path_method(call: ast.Call, names: dict[str, str]) -> str | None:
    """The pathlib method a call makes on a path ('.open', '.replace', …), None for anything else."""
    if not isinstance(call.func, ast.Attribute):
        return None
    method, receiver = call.func.attr, _dotted(call.func.value)
    if receiver in NOT_PATHS:
        return None
    if method == "replace":  # see PATH_CLASSES
        on_path = _full_name(receiver, names) in PATH_CLASSES or (len(call.args) == 1 and not call.keywords)
        return f".{method}" if on_path else None
    return f".{method}" if method in FORBIDDEN_METHODS else None


def _forbidden(module: str) -> bool:
    """A forbidden module, one of its submodules (`fsspec.implementations.local`) included."""
    return any(module == name or module.startswith(f"{name}.") for name in FORBIDDEN_IMPORTS)


def filesystem_uses(source: str) -> set[str]:
    """What a module's source does to a filesystem without storage: 'open()', 'os.symlink()',
    'import shutil', '.read_bytes', 'numpy.save()', …"""
    tree = ast.parse(source)
    names = _full_names(tree)
    handles = _storage_handles(tree, names)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {f"import {a.name}" for a in node.names if _forbidden(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from pyarrow import fs` imports the module pyarrow.fs, where `from glob import glob` is glob's
            modules = [node.module] if _forbidden(node.module) else [f"{node.module}.{a.name}" for a in node.names]
            found |= {f"import {module}" for module in modules if _forbidden(module)}
        elif isinstance(node, ast.Call):
            name = _full_name(_dotted(node.func), names)
            if name in FORBIDDEN_CALLS:
                found.add(f"{name}()")
            elif name in PATH_TAKING:
                if _opens_a_path(node, name, names, handles):
                    found.add(f"{name}()")
            elif method := _path_method(node, names):
                found.add(method)
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
    "from pyarrow import fs": ("from pyarrow import fs", "import pyarrow.fs"),
    "a forbidden module's submodule": ("import fsspec.implementations.local", "import fsspec.implementations.local"),
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
    # A name bound from storage is a handle only when storage opened a file: a URI or arrow's path is a path.
    "a path from storage.uri": (
        "import faiss\ndef f(i, loc):\n    path = storage.uri(loc)\n    faiss.write_index(i, path)",
        "faiss.write_index()",
    ),
    "a path from storage.arrow": (
        "import numpy as np\ndef f(a, loc):\n    fs, where = storage.arrow(loc)\n    np.save(where, a)",
        "numpy.save()",
    ),
    "a folder from with storage.working(...)": (
        "import numpy as np\ndef f(a, loc):\n    with storage.working(loc) as where:\n        np.save(where, a)",
        "numpy.save()",
    ),
    "Path.open on a capitalised name": ("def f():\n    return STATIC_DIR.open()", ".open"),
    "Path.open(p)": ("from pathlib import Path\ndef f(p):\n    return Path.open(p)", ".open"),
    "Path.replace": ("def f(p, q):\n    p.replace(q)", ".replace"),
    "Path.replace(p, q)": ("from pathlib import Path\ndef f(p, q):\n    Path.replace(p, q)", ".replace"),
    "Path.rename": ("def f(p, q):\n    p.rename(q)", ".rename"),
    "tarfile.open(path)": ("import tarfile\ndef f(p):\n    tarfile.open(p)", "tarfile.open()"),
    "Image.open(path)": ("from PIL import Image\ndef f(p):\n    Image.open(p)", "PIL.Image.open()"),
    "pq.ParquetFile(path)": (
        "import pyarrow.parquet as pq\ndef f(p):\n    pq.ParquetFile(p)",
        "pyarrow.parquet.ParquetFile()",
    ),
    "pq.read_metadata(path)": (
        "import pyarrow.parquet as pq\ndef f(p):\n    pq.read_metadata(p)",
        "pyarrow.parquet.read_metadata()",
    ),
    "np.memmap(path)": ("import numpy as np\ndef f(p):\n    np.memmap(p, mode='r')", "numpy.memmap()"),
    "np.fromfile(path)": ("import numpy as np\ndef f(p):\n    np.fromfile(p)", "numpy.fromfile()"),
    "pa.memory_map(path)": ("import pyarrow as pa\ndef f(p):\n    pa.memory_map(p)", "pyarrow.memory_map()"),
    "torch.save(path)": ("def f(m, p):\n    import torch\n    torch.save(m.state_dict(), p)", "torch.save()"),
    "os.lstat": ("import os\ndef f(p):\n    os.lstat(p)", "os.lstat()"),
    "os.path.getmtime": ("import os\ndef f(p):\n    os.path.getmtime(p)", "os.path.getmtime()"),
    "os.path.getctime": ("from os import path\ndef f(p):\n    path.getctime(p)", "os.path.getctime()"),
}


@pytest.mark.parametrize("kind", LEAKS)
def test_the_check_sees_each_kind_of_leak(kind):
    source, finding = LEAKS[kind]
    assert filesystem_uses(source) == {finding}


def test_the_check_lets_through_what_goes_through_storage():
    source = """
import contextlib
import dataclasses
import io
import tarfile
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
def f(root, table, index, storage, catalog, moment, Searcher):
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
    Image.open(io.BytesIO(b""))
    with storage.open_input(root / "s.tar") as f, tarfile.open(fileobj=f) as tar, contextlib.ExitStack() as stack:
        pq.ParquetFile(f).metadata
        out = stack.enter_context(storage.open_append(root / "log"))
        np.savetxt(out, table)
    Searcher.open(root)
    "a_b".replace("_", "-"), dataclasses.replace(index, k=1), moment.replace(tzinfo=None)
"""
    assert filesystem_uses(source) == set()


def _stage_of(path: Path) -> str:
    """The stage a module belongs to: a module under stages/, or a package there (its modules are one stage)."""
    return path.relative_to(STAGES).parts[0].removesuffix(".py")


def _below_rayclip(name: str, level: int, package: list[str]) -> list[str] | None:
    """A module's name as its parts below rayclip ("rayclip.stages.embed" -> ["stages", "embed"]), a
    relative one (`level` dots) resolved against `package`; None for a module outside rayclip."""
    if level:
        return package[: max(0, len(package) - level + 1)] + (name.split(".") if name else [])
    parts = name.split(".")
    return parts[1:] if parts[0] == "rayclip" else None


def _stages_in(parts: list[str], imported: list[str]) -> set[str]:
    """The stages importing `parts` (below rayclip) with `imported` names from it brings in: a stage's
    module, a stage named from stages/ or the package root, or "pipeline"/"cli", which import them all."""
    if not parts:  # `from rayclip import pipeline`, `from ... import pipeline`, or a name rayclip exports lazily
        return set().union(*(_stages_in(rayclip._EXPORTS.get(n, n).split("."), []) for n in imported))
    if parts[0] == "stages":
        return {parts[1]} if len(parts) > 1 else set(imported)
    return {parts[0]} if parts[0] in OVER_THE_STAGES else set()


def _constant(call: ast.Call, position: int, keyword: str):
    """A call's argument (at this position, or by this keyword) if it is written as a literal, else None."""
    value = _path_argument(call, position, keyword)
    try:
        return ast.literal_eval(value) if value is not None else None
    except ValueError:
        return None


def _dynamic_import(call: ast.Call, package: list[str]) -> set[str]:
    """The stages `importlib.import_module(name, package)` or `__import__(name, g, l, fromlist, level)` brings in."""
    name = _constant(call, 0, "name")
    if not isinstance(name, str):
        return set()
    if _dotted(call.func).split(".")[-1] == "import_module":
        level, imported = len(name) - len(name.lstrip(".")), []
        named_package = _constant(call, 1, "package")
        if isinstance(named_package, str):  # else the module's own, as `package=__package__` gives
            package = _below_rayclip(named_package, 0, []) or []
    else:
        level, imported = _constant(call, 4, "level") or 0, list(_constant(call, 3, "fromlist") or [])
    parts = _below_rayclip(name.lstrip("."), level, package)
    return _stages_in(parts, imported) if parts is not None else set()


def stage_imports(source: str, package: list[str]) -> set[str]:
    """The stages a module in `package` (["stages", ...]) imports: relative imports resolved against
    it, rayclip.stages.x, importlib.import_module or __import__ of one by name (with its package or
    fromlist), and "pipeline" (or "cli") for a module above the stages, which imports every stage."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = _below_rayclip(node.module or "", node.level, package)
            if parts is not None:
                found |= _stages_in(parts, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = _below_rayclip(a.name, 0, package)
                found |= _stages_in(parts, []) if parts else set()
        elif isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("import_module", "__import__"):
            found |= _dynamic_import(node, package)
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
    "a name rayclip exports from pipeline": ("from rayclip import Hooks", {"pipeline"}),
    "the same, relative": ("from ... import run_demo", {"pipeline"}),
    "from ...pipeline import x": ("from ...pipeline import run_stage", {"pipeline"}),
    "import rayclip.pipeline": ("import rayclip.pipeline", {"pipeline"}),
    "importlib": ("import importlib\nimportlib.import_module('rayclip.stages.embed')", {"embed"}),
    "__import__": ("__import__('rayclip.stages.embed')", {"embed"}),
    "importlib of pipeline": ("import importlib\nimportlib.import_module('rayclip.pipeline')", {"pipeline"}),
    "importlib of a pipeline module": (
        "import importlib\nimportlib.import_module('rayclip.pipeline.embedding')",
        {"pipeline"},
    ),
    "importlib relative to a package": (
        "from importlib import import_module\nimport_module('.embed', package='rayclip.stages')",
        {"embed"},
    ),
    "importlib relative to its own package": (
        "import importlib\nimportlib.import_module('..embed', __package__)",
        {"embed"},
    ),
    "__import__ with a fromlist": ("__import__('rayclip.stages', fromlist=['embed'])", {"embed"}),
    "__import__ with a positional fromlist": ("__import__('rayclip.stages', None, None, ('embed',))", {"embed"}),
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


# Fixtures: a name means one thing in the whole suite, and several things come back as a named
# dataclass, not a tuple read by position.
def _is_fixture(decorator: ast.AST) -> bool:
    return _dotted(decorator.func if isinstance(decorator, ast.Call) else decorator).endswith("fixture")


def fixture_names(source: str) -> set[str]:
    """The fixtures a source defines, by the name tests ask for (`name=` when given)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in filter(_is_fixture, node.decorator_list):
                given = [k.value.value for k in getattr(d, "keywords", []) if k.arg == "name"]
                names.add(given[0] if given else node.name)
    return names


def _own_nodes(function: ast.AST):
    """A function's nodes, not those of the functions defined inside it."""
    for child in ast.iter_child_nodes(function):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield child
            yield from _own_nodes(child)


def tuple_fixtures(source: str) -> set[str]:
    """The fixtures of a source that return or yield a tuple written as one (`return root, build`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_is_fixture, node.decorator_list)):
            if any(isinstance(n, (ast.Return, ast.Yield)) and isinstance(n.value, ast.Tuple) for n in _own_nodes(node)):
                found.add(node.name)
    return found


def test_each_fixture_name_is_defined_once_and_no_fixture_hands_out_a_tuple():
    defined, tuples = {}, {}
    for path in sorted(TESTS.rglob("*.py")):
        source, where = path.read_text(encoding="utf-8"), path.relative_to(TESTS).as_posix()
        for name in fixture_names(source):
            defined.setdefault(name, []).append(where)
        if found := tuple_fixtures(source):
            tuples[where] = sorted(found)
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}
    assert tuples == {}


def test_the_fixture_checks_see_a_name_and_a_tuple():
    source = """
import pytest
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    def helper():
        return 1, 2  # a helper's tuple is not the fixture's
    return helper(), 3
@pytest.fixture(name="renamed")
def _yields(tmp_path):
    yield tmp_path, 1
@fixture
def single(tmp_path):
    return tmp_path
def not_a_fixture():
    return 1, 2
"""
    assert fixture_names(source) == {"pair", "renamed", "single"}
    assert tuple_fixtures(source) == {"pair", "_yields"}
