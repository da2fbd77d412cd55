"""The package's import graph: no cycles, and the library never imports the experiment harness.

Every ``import``/``from … import`` inside ``src/tadq`` counts, also the ones inside functions: a lazy import that
closes a cycle still couples the two modules (it only hides the cycle from the interpreter). Imports under
``if TYPE_CHECKING:`` are never executed and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tadq"
HARNESS = "tadq.experiments"
HARNESS_CLIENTS = ("tadq.experiments", "tadq.cli")  # the CLI is a client of the harness, like benchmarks/


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in (SRC / PACKAGE).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name refers to: itself if it is a module, else its longest module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking_block(child))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_graph_sees_lazy_imports() -> None:
    # the check would be toothless if function-level imports were missed: the CLI imports the harness lazily
    graph = import_graph()
    assert any(target.startswith(HARNESS) for target in graph["tadq.cli.app"])


def test_no_import_cycles() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles in src/tadq:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_library_never_imports_the_harness() -> None:
    offenders = {
        module: sorted(t for t in targets if t.startswith(HARNESS))
        for module, targets in import_graph().items()
        if not module.startswith(HARNESS_CLIENTS)
    }
    offenders = {module: targets for module, targets in offenders.items() if targets}
    assert not offenders, f"library modules importing {HARNESS}: {offenders}"


@pytest.mark.parametrize("cycle", [["a", "b"], ["a", "b", "c"]])
def test_cycle_finder_finds_a_planted_cycle(cycle: list[str]) -> None:
    graph = {name: {cycle[(i + 1) % len(cycle)]} for i, name in enumerate(cycle)}
    graph["leaf"] = {cycle[0]}
    assert _cycles(graph) == [sorted(cycle)]
