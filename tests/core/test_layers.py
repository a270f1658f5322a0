"""The package's layering, read from the source: no import cycles, transports below connections.

Parsed with :mod:`ast`, not imported: every ``import`` statement counts,
including those inside functions and under ``TYPE_CHECKING`` (a cycle
hidden there still ties the two modules together for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trionet"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def trionet_imports(path: Path, modules: set[str]) -> set[str]:
    """The trionet modules ``path`` imports (``from . import x``: module ``x`` if it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import x` may name a module rather than an attribute.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): trionet_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` as a path of module names, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "trionet._framing" in graph["trionet._connection"]
    assert "trionet._server" in graph["trionet._runner"]


def test_no_import_cycles_in_trionet() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("transport", ["trionet._transport", "trionet._socket", "trionet._tls"])
def test_transports_import_neither_connections_nor_servers(transport: str) -> None:
    above = {"trionet._connection", "trionet._server", "trionet._service", "trionet._runner"}
    assert not import_graph()[transport] & above


def os_uses(tree: ast.AST, names: set[str]) -> set[str]:
    """``os.NAME`` for each of ``names`` the code calls or passes on (``run_sync(os.read)``)."""
    return {
        f"os.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
        and node.attr in names
    }


def test_only_the_socket_transport_does_descriptor_io() -> None:
    """``os.read``/``os.write``/``os.sendfile`` live in trionet._socket, except
    reads of a terminal (the clients' standard input) and the parent's write of
    the config snapshot its workers read (an anonymous memory file), which are
    not sockets."""
    not_sockets = {
        "trionet._workers": {"os.write"},
        "trionet.services.chat.client": {"os.read"},
        "trionet.services.echo.client": {"os.read"},
    }
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        used = os_uses(ast.parse(path.read_text()), {"read", "write", "sendfile"})
        if name == "trionet._socket":
            assert used == {"os.read", "os.write", "os.sendfile"}
        else:
            assert used <= not_sockets.get(name, set()), (name, used)
