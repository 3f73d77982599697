"""The shape of `src/spoold`, read with `ast`: no import cycles, no private names across modules, handlers and
transports independent of the daemon, no module past 400 lines (../shared/STYLE.md, "Shape")."""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src"
PACKAGE = "spoold"
MAX_LINES = 400
# `os._exit` is the way out of a process that must not run its cleanup.
ALLOWED_PRIVATE_OWNERS = frozenset({"self", "cls", "os"})
INDEPENDENT_PACKAGES = ("spoold.handlers", "spoold.transports")
DAEMON = "spoold.daemon"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    where: str  # path relative to the repository, for messages
    is_package: bool
    tree: ast.Module
    line_count: int


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the spoold module imported
    names: tuple[str, ...]  # what was taken from it (`from x import a, b`); empty for `import x` or a submodule
    where: str  # file:line of the statement

    def describe(self) -> str:
        taken = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.where}: {self.source} -> {self.target}{taken}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


class Tree:
    """The `spoold` package under a source root, parsed; each `find_*` returns the violations of one rule."""

    def __init__(self, src: Path, base: Path) -> None:
        self.src = src
        self.base = base

    @cached_property
    def modules(self) -> dict[str, Module]:
        modules = {}
        for path in sorted((self.src / PACKAGE).rglob("*.py")):
            parts = list(path.relative_to(self.src).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
            modules[name] = Module(name, str(path.relative_to(self.base)), is_package, tree, len(text.splitlines()))
        return modules

    @cached_property
    def known(self) -> frozenset[str]:
        """Every importable spoold name: modules and packages, namespace packages (no `__init__.py`) included."""
        names = set(self.modules)
        for name in self.modules:
            parts = name.split(".")
            names.update(".".join(parts[:n]) for n in range(1, len(parts)))
        return frozenset(names)

    def existing(self, name: str) -> str:
        """`name` if spoold has that module, else its longest known prefix (`spoold.x.Class` -> `spoold.x`)."""
        while name not in self.known and "." in name:
            name = name.rpartition(".")[0]
        return name

    @staticmethod
    def resolve_from(module: Module, node: ast.ImportFrom) -> str | None:
        """The absolute module a `from ... import` reads from; relative imports resolved against `module`."""
        if node.level == 0:
            return node.module
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        parts = package.split(".")
        if node.level > len(parts):
            return None
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        return f"{base}.{node.module}" if node.module else base

    def imports(self, module: Module) -> Iterator[Import]:
        """Every import of a spoold module anywhere in the file: functions and `if TYPE_CHECKING:` included."""
        for node in ast.walk(module.tree):
            where = f"{module.where}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if within(alias.name, PACKAGE):
                        yield Import(module.name, self.existing(alias.name), (), where)
            elif isinstance(node, ast.ImportFrom):
                base = self.resolve_from(module, node)
                if base is None or not within(base, PACKAGE):
                    continue
                from_base = []
                for alias in node.names:
                    if alias.name != "*" and f"{base}.{alias.name}" in self.known:
                        yield Import(module.name, f"{base}.{alias.name}", (), where)  # a submodule
                    else:
                        from_base.append(alias.name)
                if from_base:
                    yield Import(module.name, self.existing(base), tuple(from_base), where)

    @cached_property
    def graph(self) -> dict[str, list[Import]]:
        return {name: [e for e in self.imports(module) if e.target != name] for name, module in self.modules.items()}

    def module_aliases(self, module: Module) -> dict[str, str]:
        """Names bound to a spoold module: `import spoold.x as m`, `from spoold.d import mod`, `import spoold.x`."""
        aliases: dict[str, str] = {}
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if within(alias.name, PACKAGE):
                        head = alias.name.partition(".")[0]
                        aliases[alias.asname or head] = alias.name if alias.asname else head
            elif isinstance(node, ast.ImportFrom):
                base = self.resolve_from(module, node)
                if base is not None and within(base, PACKAGE):
                    for alias in node.names:
                        if f"{base}.{alias.name}" in self.known:
                            aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        return aliases

    # ---- the rules ---------------------------------------------------------------------------------------------

    def find_cycles(self) -> list[str]:
        """Each strongly connected component, with the shortest cycle through each of its modules."""
        report = []
        for component in strongly_connected({n: [e.target for e in edges] for n, edges in self.graph.items()}):
            cycles: dict[tuple[str, ...], list[Import]] = {}
            for start in component:
                cycle = self.shortest_cycle(start, set(component))
                turn = min(range(len(cycle)), key=lambda i: cycle[i].source)
                cycle = cycle[turn:] + cycle[:turn]
                cycles.setdefault(tuple(e.source for e in cycle), cycle)
            lines = [f"cycle among {', '.join(component)}:"]
            for names, cycle in sorted(cycles.items()):
                lines.append("  " + " -> ".join([*names, names[0]]))
                lines.extend(f"    {edge.describe()}" for edge in cycle)
            report.append("\n".join(lines))
        return report

    def shortest_cycle(self, start: str, members: set[str]) -> list[Import]:
        """Breadth-first from `start` inside its component, back to `start`: the import statements on the way."""
        came_by: dict[str, Import] = {}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for edge in self.graph[node]:
                    if edge.target not in members:
                        continue
                    if edge.target == start:
                        path = [edge]
                        while path[0].source != start:
                            path.insert(0, came_by[path[0].source])
                        return path
                    if edge.target not in came_by:
                        came_by[edge.target] = edge
                        following.append(edge.target)
            frontier = following
        raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")

    def find_private_imports(self) -> list[str]:
        found = set()
        for module in self.modules.values():
            for edge in self.imports(module):
                private = [n for n in edge.names if is_private(n)]
                private += [part for part in edge.target.split(".") if is_private(part)]
                if private and edge.target != module.name:
                    found.add(f"{edge.where}: imports {', '.join(private)} from {edge.target}")
        return sorted(found)

    def find_private_attributes(self) -> list[str]:
        """`x._name` where `x` is any name but `self`/`cls`/`os`, and `spoold.mod._name` through an imported module."""
        found = []
        for module in self.modules.values():
            aliases = self.module_aliases(module)
            for node in ast.walk(module.tree):
                if not isinstance(node, ast.Attribute) or not is_private(node.attr):
                    continue
                owner = dotted(node.value)
                head, _, rest = (owner or "").partition(".")
                target = ".".join(filter(None, (aliases.get(head), rest))) if head in aliases else ""
                if target in self.known:
                    of = f"module {target}"
                elif isinstance(node.value, ast.Name) and head not in ALLOWED_PRIVATE_OWNERS:
                    of = "another object"
                else:
                    continue
                found.append((node.lineno, f"{module.where}:{node.lineno}: {owner}.{node.attr} (private to {of})"))
        return [text for _, text in sorted(found, key=lambda f: (f[1].partition(":")[0], f[0]))]

    def find_daemon_imports(self) -> list[str]:
        found = []
        for name, edges in self.graph.items():
            if any(within(name, package) for package in INDEPENDENT_PACKAGES):
                found.extend(edge.describe() for edge in edges if within(edge.target, DAEMON))
        return sorted(found)

    def find_long_modules(self) -> list[str]:
        return [f"{m.where}: {m.line_count} lines" for m in self.modules.values() if m.line_count > MAX_LINES]


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one node, or of a node pointing at itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

    for root in sorted(graph):
        if root in index:
            continue
        visit(root)
        work = [(root, iter(graph.get(root, [])))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    visit(child)
                    work.append((child, iter(graph.get(child, []))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while not component or component[-1] != node:
                    component.append(stack.pop())
                    on_stack.discard(component[-1])
                if len(component) > 1 or node in graph.get(node, []):
                    found.append(sorted(component))
    return sorted(found)


def spoold_tree() -> Tree:
    return Tree(SRC, REPO)


# ---- the checks on spoold -------------------------------------------------------------------------------------


def test_the_walk_sees_the_package() -> None:
    """The rules below are only as good as the graph: it must see spoold's modules and their imports."""
    tree = spoold_tree()
    assert {"spoold.cli", "spoold.handlers", "spoold.handlers.base", "spoold.daemon.sidecar"} <= set(tree.modules)
    edges = {(e.source, e.target) for edges in tree.graph.values() for e in edges}
    assert ("spoold.handlers.checksum", "spoold.handlers.base") in edges
    assert any(source == "spoold.cli" and within(target, DAEMON) for source, target in edges)


def test_no_import_cycles() -> None:
    cycles = spoold_tree().find_cycles()
    assert not cycles, "import cycles in src/spoold (imports under TYPE_CHECKING count too):\n" + "\n".join(cycles)


def test_no_private_names_imported_from_other_modules() -> None:
    found = spoold_tree().find_private_imports()
    assert not found, "private names imported from other spoold modules:\n" + "\n".join(found)


def test_no_private_attributes_used_from_outside() -> None:
    """E.g. a helper calling `daemon._set_state(...)` on the loop object it was handed."""
    found = spoold_tree().find_private_attributes()
    assert not found, "private attributes used outside their own class or module:\n" + "\n".join(found)


def test_handlers_and_transports_do_not_import_the_daemon() -> None:
    found = spoold_tree().find_daemon_imports()
    assert not found, "handlers and transports must not depend on spoold.daemon:\n" + "\n".join(found)


def test_modules_stay_small() -> None:
    found = spoold_tree().find_long_modules()
    assert not found, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(found)


# ---- the checker itself, on a planted package ------------------------------------------------------------------

PLANTED = {
    "__init__.py": "",
    "daemon/loop.py": "from spoold.daemon import helper\nfrom . import other as o\nimport spoold.util\n",
    "daemon/helper.py": "import typing\nif typing.TYPE_CHECKING:\n    from spoold.daemon.loop import Loop\n",
    "daemon/other.py": "def f():\n    from ..util import _hidden\n    return _hidden\n",
    "util.py": "_hidden = 1\n",
    "handlers/__init__.py": "",
    "handlers/h.py": (
        "import os\nimport spoold.util\nfrom spoold.daemon import loop\n"
        "def run(daemon):\n    daemon._poke()\n    loop._secret\n    spoold.util._hidden\n    os._exit(0)\n"
        "class C:\n    def m(self):\n        return self._x, self.__dict__\n"
    ),
    "transports/t.py": "def g():\n    from ..daemon.other import f\n    return f\n",
    "big.py": "x = 1\n" * (MAX_LINES + 1),
}


def test_the_rules_catch_planted_violations(tmp_path: Path) -> None:
    for relative, text in PLANTED.items():
        path = tmp_path / "src" / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    tree = Tree(tmp_path / "src", tmp_path)
    cycles = tree.find_cycles()
    assert len(cycles) == 1 and "cycle among spoold.daemon.helper, spoold.daemon.loop:" in cycles[0]
    assert "spoold.daemon.helper -> spoold.daemon.loop -> spoold.daemon.helper" in cycles[0]
    assert tree.find_private_imports() == ["src/spoold/daemon/other.py:2: imports _hidden from spoold.util"]
    attributes = tree.find_private_attributes()
    assert attributes == [
        "src/spoold/handlers/h.py:5: daemon._poke (private to another object)",
        "src/spoold/handlers/h.py:6: loop._secret (private to module spoold.daemon.loop)",
        "src/spoold/handlers/h.py:7: spoold.util._hidden (private to module spoold.util)",
    ]
    assert tree.find_daemon_imports() == [
        "src/spoold/handlers/h.py:3: spoold.handlers.h -> spoold.daemon.loop",
        "src/spoold/transports/t.py:2: spoold.transports.t -> spoold.daemon.other (f)",
    ]
    assert tree.find_long_modules() == [f"src/spoold/big.py: {MAX_LINES + 1} lines"]
