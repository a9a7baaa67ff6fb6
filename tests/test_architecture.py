"""The architecture, measured from the package's own source (docs/architecture.md).

Reads every module under frugallm/ with `ast` (imports anywhere in a file count, lazy imports inside
functions included) and `tokenize` (comments), and fails on:
  - an import cycle between files;
  - a cycle between rooms (a room is a subpackage, or a module at the package root);
  - an import by model/ of anything but model/ and config;
  - a function over MAX_FUNCTION lines, or a file over MAX_FILE lines;
  - a comment or docstring that cites a document the repository does not hold.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "frugallm"
MAX_FUNCTION = 100
MAX_FILE = 450
MODEL_MAY_IMPORT = ("frugallm.model", "frugallm.config")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict) -> list[str]:
    """The package modules one import statement names (a `from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return [t for t in targets if t in known] + [t.rsplit(".", 1)[0] for t in targets
                                                     if t not in known and t.rsplit(".", 1)[0] in known]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in known else base)
    return [f for f in found if f in known]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(t for t in _imported(name, path, node, known) if t != name)
        graph.setdefault(name, set())
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return "frugallm" if len(parts) == 1 else f"frugallm.{parts[1]}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for src, targets in graph.items():
        rooms[room(src)].update(room(t) for t in targets if room(t) != room(src))
        rooms.setdefault(room(src), set())
    return rooms


def test_no_import_cycle_between_files():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_rooms():
    rooms = room_graph(import_graph())
    found = cycles(rooms)
    detail = {r: sorted(rooms[r]) for c in found for r in c}
    assert found == [], f"room cycles {found}; edges {detail}"


def test_model_imports_only_model_and_config():
    bad = {src: sorted(t for t in targets if not t.startswith(MODEL_MAY_IMPORT))
           for src, targets in import_graph().items() if src.startswith("frugallm.model")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_function_and_file_sizes():
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE:
            too_long.append(f"{name}: {len(text.splitlines())} lines (file)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    too_long.append(f"{name}.{node.name}: {length} lines (function)")
    assert too_long == []


# A cited document: a path ending in .md, or the names of the design documents that live outside the repo.
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
OUTSIDE = re.compile(r"\bREFERENCE\s*(?:§|\.md)|\bDESIGN\.md|\bshared/(?:REFERENCE|DESIGN|seeds)")


def _texts(path: Path):
    """(line, text) of every comment and docstring in a file."""
    source = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "lineno", 1), doc


def citation_problems(path: Path, repo: Path = REPO) -> list[str]:
    problems = []
    for line, text in _texts(path):
        if OUTSIDE.search(text):
            problems.append(f"{path}:{line}: cites a document outside the repository")
        for doc in CITED.findall(text):
            if not any((base / doc).exists() for base in (repo, repo / "docs", path.parent)):
                problems.append(f"{path}:{line}: cites {doc}, which the repository does not hold")
    return problems


@pytest.mark.parametrize("folder", ["frugallm", "benchmarks", "tests"])
def test_comments_cite_documents_the_repository_holds(folder):
    problems = [p for path in sorted((REPO / folder).rglob("*.py")) for p in citation_problems(path)]
    assert problems == []


def test_the_checks_catch_what_they_claim(tmp_path):
    """The detectors themselves: a two-file cycle, a room cycle and a missing citation are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert room("frugallm.infer.engine") == "frugallm.infer" and room("frugallm.cli") == "frugallm.cli"
    rooms = room_graph({"frugallm.x.a": {"frugallm.y.b"}, "frugallm.y.b": {"frugallm.x.c"}, "frugallm.x.c": set()})
    assert cycles(rooms) == [["frugallm.x", "frugallm.y"]]
    (tmp_path / "README.md").write_text("")
    bad = tmp_path / "m.py"
    bad.write_text('"""See REFERENCE §2 and notes/missing.md."""\n# and README.md, which exists\nx = 1  # DESIGN.md\n')
    found = citation_problems(bad, repo=tmp_path)
    assert sum("outside the repository" in f for f in found) == 2  # the two outside names, lines 1 and 3
    assert any("notes/missing.md" in f for f in found) and not any("README.md" in f for f in found)
