"""DESIGN.md section 2, checked on the source: what may import what (every import statement, also the
ones inside functions, which run later but still depend)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _nodes(node: ast.AST, module_level: bool):
    for child in ast.iter_child_nodes(node):
        if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield child
        yield from _nodes(child, module_level)


def _imports(path: Path, module_level: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of each import in ``path`` (``module_level``: those run on import, not
    inside a function); relative imports stay inside the package."""
    found = []
    for node in _nodes(ast.parse(path.read_text(), str(path)), module_level):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _of(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_only_converters_evaluation_imports_agent():
    allowed = ROOT / "converters" / "evaluation.py"
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in _sources("converters") if path != allowed
                 for line, module in _imports(path) if _of("agent", module)]
    assert not offenders, "converters reach agent only through converters/evaluation.py:\n" + "\n".join(offenders)
    # What evaluation.py takes: the agent's runtime, and (the one exception to "nothing else of agent",
    # re-exported for packaging and stats) the drift reference the agent's monitor compares traffic with.
    taken = {module for _, module in _imports(allowed) if _of("agent", module)}
    assert taken and all(_of("agent.runtime", m) or m == "agent.drift.reference" for m in taken), taken


def test_agent_never_imports_converters():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}" for path in _sources("agent")
                 for line, module in _imports(path) if _of("converters", module)]
    assert not offenders, "\n".join(offenders)


def test_core_imports_converters_only_lazily():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}" for path in _sources("edgepack")
                 for line, module in _imports(path, module_level=True) if _of("converters", module)]
    assert not offenders, "\n".join(offenders)
