"""The house rules on imports, read from the source with ``ast``: no import cycles between effcompile's
modules, no module importing another's private (``_name``) names, nothing under ``rewrite/`` importing a
particular pass (only the registry iterates the ``effcompile.passes`` package). The benchmark scripts under
``tools/`` are read as importers too: they use effcompile's public names only."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = (("rewrite", "effcompile"), ("passes", "effcompile.passes"), ("tools", "tools"))  # tools: importers only


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    modules = {}
    for folder, package in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([package] + (parts[:-1] if is_package else parts))
            modules[name] = (ast.parse(path.read_text()), is_package)
    return modules


def _imports(modules: dict[str, tuple[ast.Module, bool]]) -> list[tuple[str, str, str | None]]:
    """(importer, imported module, imported name or None) for every import of an effcompile module."""
    found = []
    for name, (tree, is_package) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(name, alias.name, None) for alias in node.names if alias.name.startswith("effcompile")]
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_package else name.split(".")[:-1]
                source = node.module or "" if node.level == 0 else \
                    ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    found.append((name, target if target in modules else source, alias.name))
    return [(a, b, n) for a, b, n in found if b.startswith("effcompile")]


def test_no_private_names_cross_modules_and_rewrite_imports_no_pass():
    imports = _imports(_modules())
    private = [(a, b, n) for a, b, n in imports if n and n.startswith("_") and not n.startswith("__") and a != b]
    assert private == []
    to_passes = [(a, b) for a, b, _ in imports
                 if a.startswith("effcompile.") and not a.startswith("effcompile.passes")
                 and b.startswith("effcompile.passes.")]
    assert to_passes == []


def test_no_import_cycles():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in _imports(modules):
        # a package importing its own submodules, or a module its parent package, is not a cycle
        if imported in modules and not imported.startswith(importer + ".") and not importer.startswith(imported + "."):
            graph.setdefault(importer, set()).add(imported)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []
