"""Architecture rules of docs/architecture.md that a test can hold: file size, and what model/ may import."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "frugallm"


@pytest.mark.parametrize("path", sorted((PKG / "model").glob("*.py")) + sorted((PKG / "infer").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_concept_files_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 450, f"{path.name} has {lines} lines; split it by concept (DESIGN.md principle 2)"


def test_model_imports_only_torch_and_siblings():
    for path in (PKG / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module == "config", f"{path.name} imports frugallm.{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("torch", "__future__", "dataclasses", "typing", "math"), \
                    f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ("torch", "math"), f"{path.name} imports {alias.name}"
