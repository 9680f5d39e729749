"""The layers import one way: ops -> nn -> data, eval -> train -> serve -> cli.

A user takes the heads into their own training code after a plain ``pip install angular`` (torch,
torchvision and numpy), so ``angular``, ``angular.ops`` and ``angular.nn`` must import, and train a
head, with every package of the ``pipeline`` and ``serve`` extras missing. No module reaches up to
the package root or into another module's private (underscore) names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The import names of the pipeline and serve extras (pyproject.toml), and torchvision, which the
# core depends on but imports only where a ResNet backbone or an augmentation is built.
BLOCKED = (
    "dvc",
    "faiss",
    "matplotlib",
    "mlflow",
    "onnx",
    "onnxruntime",
    "PIL",
    "pydantic",
    "pydantic_core",
    "scipy",
    "sklearn",
    "threadpoolctl",
    "torchvision",
    "tqdm",
    "yaml",
)

# What each subpackage may import from the project (besides itself). Config is the params.yaml
# schema: it names the heads, backbones and ensemble rules, and the pipeline layers read it. Files,
# devices and heap are leaves (atomic writes, the device choice, the CPU heap setting).
ALLOWED = {
    "ops": set(),
    "nn": {"ops"},
    "eval": set(),
    "config": {"ops", "nn", "eval"},
    "data": {"config"},
    "files": set(),
    "devices": set(),
    "heap": set(),
    "train": {"ops", "nn", "data", "eval", "config", "files", "devices", "heap"},
    "serve": {"ops", "nn", "data", "eval", "config", "files", "devices", "heap"},
    "cli": {"ops", "nn", "data", "eval", "config", "files", "devices", "heap", "train", "serve"},
}

# A package that is "not installed": finding it succeeds without a file (torch probes optional
# packages with importlib.util.find_spec and must not fail), importing it raises ImportError.
BLOCKER = f"""
import importlib.abc, importlib.machinery, sys
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError("blocked: " + spec.name)
    def exec_module(self, module):
        raise ImportError("blocked: " + module.__name__)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    "module", ["angular", "angular.ops", "angular.nn", "angular.nn.recognition"]
)
def test_the_core_imports_and_trains_without_the_pipeline_or_serve_extras(module):
    code = (
        BLOCKER
        + f"import {module}\n"
        + "from angular import ArcFace, margin_cross_entropy, build_backbone\n"
        + "import torch\n"
        + "head = ArcFace(embedding_dim=8, num_classes=5)\n"
        + "loss = head.loss(torch.randn(3, 8), torch.tensor([0, 4, -1]))\n"
        + "loss.backward()\n"
        + "backbone = build_backbone('small_cnn', in_channels=1, embedding_dim=8)\n"
        + "backbone(torch.randn(2, 1, 8, 8)).sum().backward()\n"
        + f"assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        + "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", ["mlflow", "onnxruntime", "torchvision", "yaml"])
def test_the_blocker_really_blocks(name):
    """The test above can fail: importing a blocked package under the blocker raises."""
    code = BLOCKER + f"import {name}\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and f"blocked: {name}" in result.stderr


# --- Packaging (pyproject.toml): each import is declared where its layer is installed ----------

# Import name -> the requirement of pyproject.toml that provides it.
DISTRIBUTIONS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "triton": "torch",  # torch requires it on Linux (angular.ops.triton_linear says so without it)
    "numpy": "numpy",
    "dvc": "dvc",
    "mlflow": "mlflow",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "threadpoolctl": "threadpoolctl",
    "PIL": "pillow",
    "tqdm": "tqdm",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "faiss": "faiss-cpu",
}
# Which requirements each part of the code may count on: `pip install .` gives the core, the
# pipeline extra the rest of the package and the stages, the serve extra (which brings the
# pipeline's) ONNX and faiss.
CORE_PARTS = {"ops", "nn", "__init__"}
SERVE_PARTS = {"serve", "cli"}


def _requirements() -> dict[str, set[str]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        found = set()
        for requirement in requirements:
            name = requirement.split(";")[0].split("[")[0]
            for stop in "<>=!~ ":
                name = name.split(stop)[0]
            found.add(name.strip().lower())
        return found - {"angular"}

    extras = project["optional-dependencies"]
    return {
        "core": names(project["dependencies"]),
        "pipeline": names(extras["pipeline"]),
        "serve": names(extras["serve"]) | names(extras["pipeline"]),
    }


def _third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"angular", "pipeline", "__future__"}


def test_every_import_is_declared_where_its_layer_is_installed():
    requirements = _requirements()
    wrong = []
    for path in sorted((REPO / "angular").rglob("*.py")) + sorted((REPO / "pipeline").glob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        part = parts[1] if parts[0] == "angular" else "pipeline"
        if part in CORE_PARTS:
            allowed = requirements["core"]
        elif part in SERVE_PARTS:
            allowed = requirements["core"] | requirements["serve"]
        else:
            allowed = requirements["core"] | requirements["pipeline"]
        for name in sorted(_third_party_imports(path)):
            if DISTRIBUTIONS.get(name) not in allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {name} ({DISTRIBUTIONS.get(name)})")
    assert not wrong, "\n".join(wrong)


def test_the_blocked_packages_are_the_extras():
    """The core test blocks exactly what `pip install .` leaves out, and torchvision."""
    requirements = _requirements()
    extras = (requirements["pipeline"] | requirements["serve"]) - requirements["core"]
    blocked = {DISTRIBUTIONS[name] for name in BLOCKED}
    assert blocked == extras | {"torchvision"}
    assert requirements["core"] == {"torch", "torchvision", "numpy"}


def _layer(path: Path) -> str:
    parts = path.relative_to(REPO / "angular").with_suffix("").parts
    return parts[0]


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "angular" and len(parts) > 1 and ".".join(parts[:2]) in KNOWN:
                found.add(parts[1])
    return found


def test_dependencies_point_one_way():
    files = [
        p
        for p in (REPO / "angular").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name != "angular"
    ]
    assert files
    wrong = []
    for path in files:
        layer = _layer(path)
        for other in _imported_layers(path) - {layer} - ALLOWED.get(layer, set()):
            wrong.append(f"{path.relative_to(REPO)} ({layer}) imports angular.{other}")
    assert not wrong, "\n".join(wrong)


def test_every_part_of_the_package_has_a_layer():
    """A new subpackage or top-level module takes its place in ALLOWED, so the rule covers it."""
    parts = {name.split(".")[1] for name in KNOWN if name.startswith("angular.")}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


# --- Imports resolved to project modules (angular/, pipeline/, benchmarks/) ---------------------

# Compiled modules (setup.py builds them from csrc/): project modules with no .py file.
EXTENSION_MODULES = {"angular.ops._C"}
# Where the modules live, and the import name of a module file below that folder.
SOURCE_ROOTS = {
    "angular": REPO,  # angular.ops.margin
    "pipeline": REPO,  # pipeline.train
    "benchmarks": REPO / "benchmarks",  # formulations (benchmarks/ is on the path)
    "experiments/faces": REPO / "experiments" / "faces",  # seeds (only resolved, not checked)
}
CHECKED = ("angular", "pipeline", "benchmarks")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    """Every project module by import name, and the file it is in."""
    modules = {}
    for folder, root in SOURCE_ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            modules[_module_name(path, root)] = path
    return modules


MODULES = _project_modules()
KNOWN = set(MODULES) | EXTENSION_MODULES


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _outside(importer: str, dotted: str) -> str | None:
    """The first private part of ``dotted`` that ``importer`` has no right to, or None.

    A private module (``angular.ops._extension``) belongs to its package: the modules of that
    package may import it. A private name inside a module belongs to that module alone.
    """
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not _private(part):
            continue
        owner = ".".join(parts[:i])
        if ".".join(parts[: i + 1]) in KNOWN:  # a private module: its package may use it
            if importer == owner or importer.startswith(owner + "."):
                continue
        elif owner == importer:  # a module's own private name
            continue
        return ".".join(parts[: i + 1])
    return None


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer.split(".")
    if not is_package:
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None when the chain does not start with a name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def _private_uses(source: str, importer: str, is_package: bool, label: str) -> list[str]:
    """Each import of, or attribute access to, another project module's private name in
    ``source``, the text of module ``importer``, as ``label:line: name``."""
    tree = ast.parse(source)
    bound = {}  # local name -> the project module it names
    found = []

    def note(node: ast.AST, dotted: str) -> None:
        private = _outside(importer, dotted)
        if private:
            found.append(f"{label}:{node.lineno}: {private}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in {m.split(".")[0] for m in KNOWN}:
                    continue
                note(node, alias.name)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(importer, is_package, node)
            if module not in KNOWN:
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                note(node, f"{module}.{alias.name}")
                if f"{module}.{alias.name}" in KNOWN:
                    bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    for node in ast.walk(tree):
        chain = None
        if isinstance(node, ast.Attribute):
            chain = _dotted(node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            base = _dotted(node.args[0])
            chain = None if base is None else [*base, node.args[1].value]
        if not chain or chain[0] not in bound:
            continue
        module = bound[chain[0]]
        rest = chain[1:]
        # Walk down the submodules (angular.ops.margin), then the first name in the module.
        while rest and f"{module}.{rest[0]}" in KNOWN and not _private(rest[0]):
            module, rest = f"{module}.{rest[0]}", rest[1:]
        if rest:
            note(node, f"{module}.{rest[0]}")
    return sorted(set(found))


def _private_uses_in(path: Path) -> list[str]:
    root = REPO / "benchmarks" if path.is_relative_to(REPO / "benchmarks") else REPO
    return _private_uses(
        path.read_text(encoding="utf-8"),
        _module_name(path, root),
        path.name == "__init__.py",
        str(path.relative_to(REPO)),
    )


def _checked_files() -> list[Path]:
    return [path for folder in CHECKED for path in sorted((REPO / folder).rglob("*.py"))]


def test_no_module_uses_another_modules_private_names():
    """``from M import _name``, ``import M._private``, ``M._name`` and ``getattr(M, "_name")``
    on another project module are refused: what is shared is public, what is private stays home.
    A package's private modules (``angular.ops._extension``) are for that package's own modules."""
    files = _checked_files()
    assert len(files) > 50
    wrong = [line for path in files for line in _private_uses_in(path)]
    assert not wrong, "private names used from outside their module:\n" + "\n".join(wrong)


def test_the_private_name_walk_finds_what_it_should():
    """The walk above can fail: each way of reaching a private name is found, and public names,
    dunders, a package's own private module and a module's own private names are not."""
    source = """
import angular.ops.margin
import angular.ops._extension
import angular.ops.margin as margin_module
from angular.ops import _extension, margin, reference
from angular.ops.margin import _private_helper, check_number, __doc__
from angular import __version__
import torch

def f(x):
    margin._fused_for(x)
    angular.ops.margin._fused_for(x)
    margin_module._fused_for
    getattr(reference, "_secret")
    torch._C
    margin.check_number
    margin.__name__
    x._whatever
    _own_helper(x)
"""
    outside = _private_uses(source, "bench_probe", False, "probe")
    assert [line.split(":", 1)[1] for line in outside] == [
        "11: angular.ops.margin._fused_for",
        "12: angular.ops.margin._fused_for",
        "13: angular.ops.margin._fused_for",
        "14: angular.ops.reference._secret",
        "3: angular.ops._extension",
        "5: angular.ops._extension",
        "6: angular.ops.margin._private_helper",
    ]
    # Inside angular.ops its private module is its own; other modules' private names are not.
    inside = _private_uses(source, "angular.ops.probe", False, "probe")
    assert [line.split(":", 1)[1] for line in inside] == [
        "11: angular.ops.margin._fused_for",
        "12: angular.ops.margin._fused_for",
        "13: angular.ops.margin._fused_for",
        "14: angular.ops.reference._secret",
        "6: angular.ops.margin._private_helper",
    ]
    # A module's own private names are its own, also through its own name.
    own = "import angular.ops.margin\nangular.ops.margin._fused_for\n"
    assert _private_uses(own, "angular.ops.margin", False, "probe") == []


def test_no_module_reaches_up_to_the_package_root():
    """Inside angular/, ``from angular import X`` takes only subpackages and modules: the names that
    ``angular/__init__.py`` re-exports are for users, and a module importing them depends on every
    layer the root imports."""
    wrong = []
    for path in sorted((REPO / "angular").rglob("*.py")):
        if path == REPO / "angular" / "__init__.py":
            continue
        importer = _module_name(path, REPO)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and _absolute(importer, is_package, node) == "angular"
            ):
                for alias in node.names:
                    if f"angular.{alias.name}" not in KNOWN:
                        wrong.append(
                            f"{path.relative_to(REPO)}:{node.lineno}: angular.{alias.name}"
                        )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "angular":
                        wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: import angular")
    assert not wrong, "imports from the package root:\n" + "\n".join(wrong)
