"""The layers import one way: ops -> nn -> data, eval -> train -> serve -> cli.

A user takes the heads into their own training code without DVC, MLflow or matplotlib installed,
so ``angular``, ``angular.ops`` and ``angular.nn`` must import with those blocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("dvc", "mlflow", "matplotlib")

# What each subpackage may import from the project (besides itself). Config is the params.yaml
# schema: it names the heads, backbones and ensemble rules, and the pipeline layers read it.
ALLOWED = {
    "ops": set(),
    "nn": {"ops"},
    "eval": set(),
    "config": {"ops", "nn", "eval"},
    "data": {"config"},
    "files": set(),
    "devices": set(),
    "train": {"ops", "nn", "data", "eval", "config", "files", "devices"},
    "serve": {"ops", "nn", "data", "eval", "config", "files", "devices"},
    "cli": {"ops", "nn", "data", "eval", "config", "files", "devices", "train", "serve"},
}

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    "module", ["angular", "angular.ops", "angular.nn", "angular.nn.recognition"]
)
def test_heads_and_ops_import_without_dvc_mlflow_or_matplotlib(module):
    code = (
        BLOCKER
        + f"import {module}\n"
        + "from angular import ArcFace, margin_cross_entropy, build_backbone\n"
        + "import torch\n"
        + "head = ArcFace(embedding_dim=8, num_classes=5)\n"
        + "loss = head.loss(torch.randn(3, 8), torch.tensor([0, 4, -1]))\n"
        + "loss.backward()\n"
        + f"assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        + "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_blocker_really_blocks():
    """The test above can fail: importing a blocked package under the blocker raises."""
    code = BLOCKER + "import mlflow\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "blocked: mlflow" in result.stderr


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
            if parts[0] == "angular" and len(parts) > 1 and parts[1] in ALLOWED:
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
