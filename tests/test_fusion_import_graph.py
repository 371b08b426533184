"""The fusion package's import graph has no cycle, counting the registry's lazy entries as imports.

Every ``import`` of a ``dicomnode`` module, at module level or inside a function, is an edge, and so is
every string that names one (``"dicomnode.fusion.model:CNNFuser"``, ``importlib.import_module(...)``
arguments): a lazy import still runs when it is reached. Fusers depend on the interface
(``fusion/base.py``), the registry names them, and nothing they import leads back to the registry.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = re.compile(r"^(dicomnode(?:\.\w+)+)(?::\w+)?$")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the ``dicomnode`` modules it imports (statically, lazily, or by name in a string)."""
    modules = {_module_name(p, root): p for p in (root / "dicomnode").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = MODULE_NAME.match(node.value)
                if m:
                    targets.add(m.group(1))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]], within: str) -> list[str] | None:
    """One import cycle among the modules under ``within``, or None."""
    nodes = {n for n in graph if n == within or n.startswith(within + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n] & nodes):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_fusion_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert "dicomnode.fusion.model" in graph["dicomnode.fusion.registry"]  # lazy entries are counted
    assert find_cycle(graph, "dicomnode.fusion") is None, " -> ".join(find_cycle(graph, "dicomnode.fusion"))


def test_the_cycle_finder_sees_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "dicomnode" / "fusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text('MEMBERS = ("dicomnode.fusion.member",)\n')
    (pkg / "member.py").write_text("def f():\n    from dicomnode.fusion.base import MEMBERS\n")
    assert find_cycle(import_graph(tmp_path), "dicomnode.fusion") == [
        "dicomnode.fusion.base",
        "dicomnode.fusion.member",
        "dicomnode.fusion.base",
    ]


def test_model_imported_first_then_every_registered_fuser_resolves() -> None:
    """A fresh interpreter: the model first (the chain model -> classical -> base), then the registry."""
    code = (
        "import dicomnode.fusion.model\n"
        "from dicomnode.fusion.base import Fuser\n"
        "from dicomnode.fusion.registry import FUSERS, fuser_class\n"
        "for name in FUSERS:\n"
        "    cls = fuser_class(name)\n"
        "    assert issubclass(cls, Fuser) and cls.name == name, name\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
