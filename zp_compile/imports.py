"""zp_compile's own import graph, read from the source (``ast``), lazy imports inside functions included.

Two users: the Inductor pass's cache key hashes every file the passes import, directly or not
(``backend.ZeroPrefillGraphPass.uuid``), and the test suite checks the graph has no cycle and that
the server's front end and its ranks meet only in the contract.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "zp_compile"
ROOT = Path(__file__).resolve().parent


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its body (functions included).
    A package's ``__init__`` that runs only because one of its submodules is imported is not counted."""
    known = modules()
    path = known[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            # `from pkg import mod` imports mod (and pkg's __init__, as every submodule import does: not
            # counted); `from mod import name` imports mod.
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` imports a and a.b too; keep the longest known module of each name.
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def closure(name: str) -> set[str]:
    """``name`` and every package module it imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports_of(m))
    return seen
