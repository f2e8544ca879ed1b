"""The project's layout, as a rule over every module's imports (read from the AST; nothing is imported).

- No import circle among the project's modules.  Imports inside functions count (a lazy import hides a
  circle at start-up, not from a reader), and so do the parent packages an import runs: importing
  ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first.
- ``shared/`` imports no other package of the project: every role and the orchestrator build on it.
- A role (``inference/``, ``teacher/``, ``trainer/``) imports only its own package and ``shared/``: never
  the orchestrator, never another role.  What two of them both need lives in ``shared/``.
- The orchestrator imports a role only inside a function (the one that starts that role's Ray actor or
  probes its endpoint), never at module level, ``if TYPE_CHECKING:`` blocks included.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("inference", "teacher", "trainer")
PACKAGES = ("shared", "orchestrator", *ROLES)


class Import(NamedTuple):
    source: str  # the importing module, dotted
    target: str  # the project module it loads
    line: int
    lazy: bool  # inside a function (or lambda): runs when called, not when ``source`` is imported
    implicit: bool  # a parent package that the import runs, not the module it names


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the project's packages (a package is its
    ``__init__.py``)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports(root: Path) -> list[Import]:
    """Every import of a project module by a project module, with the parent packages it runs."""
    mods = modules(root)

    def resolve(name: str) -> str | None:  # the longest prefix of ``name`` that is a project module
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = []
    for source, path in mods.items():
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]

        def named(node: ast.AST) -> list[str]:  # the dotted names an import statement loads
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            assert isinstance(node, ast.ImportFrom)
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # ``from p import x``: x is a submodule of p or a name defined in p.
            return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]

        def walk(node: ast.AST, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in {t for t in map(resolve, named(child)) if t and t != source}:
                        out.append(Import(source, target, child.lineno, lazy, False))
                        own = set(_parents(source)) | {source}
                        out.extend(Import(source, p, child.lineno, lazy, True)
                                   for p in _parents(target) if p in mods and p not in own)
                walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return out


def cycles(edges: list[Import]) -> list[list[str]]:
    """The import circles: strongly connected components of two or more modules, each sorted
    (Tarjan's algorithm over ``source -> target``)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(edges: list[Import], root: Path) -> list[str]:
    """``file:line: what`` for every import that breaks the layering rules of the module docstring."""
    mods = modules(root)
    bad = set()
    for e in edges:
        if e.implicit:
            continue
        src, dst = e.source.split(".")[0], e.target.split(".")[0]
        where = f"{mods[e.source].relative_to(root)}:{e.line}: {e.source} imports {e.target}"
        if src == "shared" and dst != "shared":
            bad.add(f"{where}: shared/ imports no other package of the project")
        elif src in ROLES and dst not in (src, "shared"):
            bad.add(f"{where}: a role imports only its own package and shared/")
        elif src == "orchestrator" and dst in ROLES and not e.lazy:
            bad.add(f"{where} at module level: the orchestrator imports a role only inside a function")
    return sorted(bad)


def test_the_project_has_no_import_circle():
    edges = imports(ROOT)
    # Not a vacuous pass: the scan sees the orchestrator start every role inside a function.
    assert {e.target.split(".")[0] for e in edges if e.source.startswith("orchestrator") and e.lazy} >= set(ROLES)
    assert cycles(edges) == []


def test_roles_shared_and_orchestrator_import_in_layers():
    assert violations(imports(ROOT), ROOT) == []


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_scan_finds_circles_and_layer_breaks_in_a_made_up_tree(tmp_path):
    _tree(tmp_path, {
        "shared/__init__.py": "",
        "shared/a.py": "from shared import b\n",  # -> shared.b (a submodule, not a name)
        "shared/b.py": "def f():\n    from .a import x\n",  # lazy, relative -> shared.a: a circle with a
        "shared/c.py": "import os\nimport orchestrator.o\n",  # shared -> orchestrator
        "orchestrator/__init__.py": "from orchestrator.o import y\n",
        "orchestrator/o.py": "from trainer.t import z\n\ndef start():\n    import inference.e\n",
        "inference/__init__.py": "",
        "inference/e.py": "from orchestrator import o\n",  # role -> orchestrator; runs orchestrator/__init__
        "trainer/__init__.py": "",
        "trainer/t.py": "from teacher.k import q\n",  # role -> another role
        "teacher/__init__.py": "",
        "teacher/k.py": "from teacher import k2\n",
        "teacher/k2.py": "",
    })
    edges = imports(tmp_path)
    assert Import("inference.e", "orchestrator", 1, False, True) in edges  # the parent package it runs
    assert Import("orchestrator.o", "inference.e", 4, True, False) in edges
    assert not any(e.source == "teacher.k" and e.target == "teacher" for e in edges)  # its own package
    # orchestrator -> orchestrator.o -(lazy)-> inference.e -> orchestrator (its __init__) and .o
    assert cycles(edges) == [["inference.e", "orchestrator", "orchestrator.o"], ["shared.a", "shared.b"]]
    assert violations(edges, tmp_path) == [
        "inference/e.py:1: inference.e imports orchestrator.o: a role imports only its own package and shared/",
        "orchestrator/o.py:1: orchestrator.o imports trainer.t at module level: "
        "the orchestrator imports a role only inside a function",
        "shared/c.py:2: shared.c imports orchestrator.o: shared/ imports no other package of the project",
        "trainer/t.py:1: trainer.t imports teacher.k: a role imports only its own package and shared/",
    ]
