"""The import graph of ``src/scalevec``, read from the source: commands stay off the training loop, and the
package's modules are in no import cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
CHECKED = ("scalevec",)  # every module of the package


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "scalevec").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it names in an import, at any depth of the file. ``from pkg import name`` counts
    as importing ``pkg`` and, where ``name`` is a submodule, ``pkg.name`` too."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*head, *([node.module] if node.module else [])])
                if base in mods:
                    graph[mod].add(base)
                graph[mod] |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
        graph[mod].discard(mod)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def checked(mod: str) -> bool:
    return any(mod == c or mod.startswith(c + ".") for c in CHECKED)


def test_no_checked_module_is_in_an_import_cycle():
    graph = import_graph()
    cycles = sorted(f"{m} -> {n}" for m in graph if checked(m) for n in graph[m] if reaches(graph, n, m))
    assert not cycles, cycles


def test_commands_import_nothing_from_the_training_loop():
    graph = import_graph()
    users = [m for m in graph if m.startswith(("scalevec.cli", "scalevec.commands", "scalevec.demo",
                                                "scalevec.study", "scalevec.sample"))]
    assert users and "scalevec.train.trainer" in graph
    assert not [m for m in users if "scalevec.train.trainer" in graph[m]]


def test_the_graph_sees_imports_inside_functions_and_from_packages(tmp_path, monkeypatch):
    """The reader itself: a cycle through a function-level ``from pkg import submodule`` is found."""
    pkg = tmp_path / "scalevec" / "train"
    pkg.mkdir(parents=True)
    (tmp_path / "scalevec" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from scalevec.train.trainer import train\n")
    (pkg / "trainer.py").write_text("def train():\n    from scalevec.train import distributed\n")
    (pkg / "distributed.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert graph["scalevec.train.trainer"] == {"scalevec.train", "scalevec.train.distributed"}
    assert reaches(graph, "scalevec.train.trainer", "scalevec.train")
