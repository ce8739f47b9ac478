"""The import graph of the package: data flows one way and nothing hides a circle.

Two rules, read from the source with ``ast`` (nothing is imported):

- the top-level imports between steerkit's own modules form no circle;
- an import inside a function is allowed only to load the heavy stack late: the importing
  module does not import torch (or transformers, numpy...) at its top, and the imported one
  does. Every other function-level import hides a circle or a layering mistake.

``if TYPE_CHECKING:`` imports are annotations only and count as neither.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "steerkit"
HEAVY = {"torch", "transformers", "transformer_lens", "peft", "numpy", "safetensors", "matplotlib", "gguf", "accelerate"}


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """Module names an import statement loads (``from steerkit import judge`` loads steerkit.judge)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level or not node.module:
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
    return subs if len(subs) == len(node.names) else [node.module, *subs]


def _top_level(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads: the module body and its try/if blocks, not TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def _in_functions(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def read_graph(pkg: Path = PKG) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """(top-level imports of each module, function-level steerkit imports of each module as (line, target))."""
    files = {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
    modules = set(files)
    top: dict[str, set[str]] = {}
    inner: dict[str, list[tuple[int, str]]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top[name] = {t for n in _top_level(tree) for t in _targets(n, modules)}
        inner[name] = [(n.lineno, t) for n in _in_functions(tree) for t in _targets(n, modules) if t in modules]
    return top, inner


def heavy_modules(top: dict[str, set[str]]) -> set[str]:
    """Modules whose loading (their own top-level imports, followed) loads the heavy stack."""
    heavy: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, deps in top.items():
            if name not in heavy and any(d.split(".")[0] in HEAVY or d in heavy for d in deps):
                heavy.add(name)
                changed = True
    return heavy


def find_circle(top: dict[str, set[str]]) -> list[str] | None:
    """One circle among the package's own top-level imports, or None."""
    own = {m: {d for d in deps if d in top and d != m} for m, deps in top.items()}
    # ``import steerkit.x`` also runs steerkit/__init__: the package's face is not an edge back
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(own[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(own):
        if m not in state and (c := visit(m)):
            return c
    return None


def misplaced_inner_imports(top: dict[str, set[str]], inner: dict[str, list[tuple[int, str]]]) -> list[str]:
    heavy = heavy_modules(top)
    bad = []
    for name, found in sorted(inner.items()):
        for line, target in found:
            if name in heavy or target not in heavy:
                why = "already loads torch at its top" if name in heavy else f"{target} is light"
                bad.append(f"{name}:{line} imports {target} inside a function, but {why}")
    return bad


def test_package_imports_have_no_circle():
    top, _ = read_graph()
    assert find_circle(top) is None


def test_function_level_imports_only_defer_the_heavy_stack():
    top, inner = read_graph()
    assert misplaced_inner_imports(top, inner) == []


def test_the_cli_entry_does_not_load_torch_for_help():
    """The entry module stays light, so `steerkit --help` and argument errors are quick."""
    top, _ = read_graph()
    assert "steerkit.cli" not in heavy_modules(top)


# the rules themselves must be able to fail: a planted package with each fault


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "steerkit"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


def test_a_planted_circle_is_found(tmp_path):
    pkg = _plant(tmp_path, {"__init__.py": "", "a.py": "from steerkit.b import x\n", "b.py": "import steerkit.c\nx = 1\n",
                            "c.py": "from steerkit import a\n"})
    top, _ = read_graph(pkg)
    circle = find_circle(top)
    assert circle is not None and set(circle) == {"steerkit.a", "steerkit.b", "steerkit.c"}


def test_type_checking_imports_are_not_edges(tmp_path):
    pkg = _plant(tmp_path, {"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from steerkit.b import x\n",
                            "b.py": "from steerkit.a import y\n"})
    top, _ = read_graph(pkg)
    assert find_circle(top) is None


@pytest.mark.parametrize(
    ("a", "b", "bad"),
    [
        ("import torch\ndef f():\n    from steerkit.b import x\n", "x = 1\n", True),  # heavy module hiding an import
        ("def f():\n    from steerkit.b import x\n", "x = 1\n", True),  # light importing light late
        ("def f():\n    from steerkit.b import x\n", "import torch\nx = 1\n", False),  # deferring torch: fine
    ],
)
def test_inner_import_rule_on_planted_modules(tmp_path, a, b, bad):
    pkg = _plant(tmp_path, {"__init__.py": "", "a.py": a, "b.py": b})
    top, inner = read_graph(pkg)
    assert bool(misplaced_inner_imports(top, inner)) is bad


def private_imports(pkg: Path = PKG) -> list[str]:
    """``from steerkit.x import _name`` outside steerkit.x: a private helper another module leans on."""
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").split(".")[0] == pkg.name:
                bad += [f"{module_name(path, pkg)}:{n.lineno} {n.module}.{a.name}" for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_module_imports_another_modules_private_helpers():
    assert private_imports() == []


def test_a_private_import_is_named(tmp_path):
    pkg = _plant(tmp_path, {"__init__.py": "", "a.py": "def _h(): pass\n", "b.py": "from steerkit.a import _h\n"})
    assert private_imports(pkg) == ["steerkit.b:1 steerkit.a._h"]


def test_function_level_stdlib_imports_are_none():
    """Standard-library modules are cheap: they go at the top, where a reader looks for them."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{module_name(path)}:{n.lineno}" for n in _in_functions(tree)
                  if any(t.split(".")[0] in sys.stdlib_module_names for t in _targets(n, set()))]
    assert found == []


LONG = 400  # lines; a module past this says why in its docstring


def long_modules_without_a_reason(pkg: Path = PKG, limit: int = LONG) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > limit and "Why one module of this size:" not in (ast.get_docstring(ast.parse(text)) or ""):
            bad.append(f"{module_name(path, pkg)} ({n} lines)")
    return bad


def test_long_modules_say_why_they_are_one_module():
    assert long_modules_without_a_reason() == []


def test_a_long_module_without_a_reason_is_named(tmp_path):
    body = "x = 1\n" * 12
    pkg = _plant(tmp_path, {"__init__.py": "", "long.py": '"""A long module."""\n' + body,
                            "said.py": '"""A long module.\n\nWhy one module of this size: it is one thing.\n"""\n' + body})
    assert long_modules_without_a_reason(pkg, limit=10) == ["steerkit.long (13 lines)"]
