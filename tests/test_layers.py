"""The modules of python/pvfast import one way, down the layers of LAYERS.

Every module is parsed with ``ast``; every import of a pvfast module is an edge, wherever it is
(a function-local import counts too: it would only hide a cycle), except imports under
``if TYPE_CHECKING:``, which never run. An edge from a layer to a higher one fails, and so does a
cycle inside a layer. A module that is in no layer fails as well, so a new file gets its place.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "pvfast"

# Lowest first. Within a layer imports may go either way as long as they form no cycle.
LAYERS: list[set[str]] = [
    {"_native"},  # the Rust Ultravisor (the compiled extension; its stub is _native.pyi)
    {"constants", "errors", "_util", "_version"},
    {"interrupts", "racepoints", "profiles"},  # race points (Host.race_point); kernel profiles and their deltas
    {"costs"},  # the cost model (TOML, defaults, the fit)
    {"accounting"},  # per-thread/process/VM accounts and the binding mm._fdget uses
    {"clock"},  # the modelled clock: waits, joins, the kernel mutex
    {"host"},  # module params, UltravisorView, kernel memory ledger, process registry, atexit hook
    {"gmap"},  # arch/s390/mm/gmap.c
    {"mm"},  # mm_struct with mmu-notifier callbacks, processes, files (fdget/fput)
    {"fault"},  # arch/s390/kernel/uv.c + arch/s390/mm/fault.c
    {"pv"},  # arch/s390/kvm/pv.c
    {"kvm"},  # arch/s390/kvm/kvm-s390.c
    {"vmm", "image", "trace", "timeline", "experiments", "cli"},  # timeline: memory held over time
    {"testing"},  # the pytest plugin (fixtures, the QEMU-shaped VMM, host checks); imports pytest
    {"__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The pvfast modules (names as in ``modules``; the package itself is ``__init__``) that
    ``source``, a module of the package, imports at run time."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pvfast":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "pvfast":
                    continue
                rest = parts[1:]
            elif node.level == 1:
                rest = node.module.split(".") if node.module else []
            else:  # beyond the package: not ours
                continue
            if rest:
                found.add(rest[0])
            else:  # from . import x: a submodule, or a name of the package's __init__
                for alias in node.names:
                    found.add(alias.name if alias.name in modules else "__init__")
    return found


def package_sources() -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.glob("*.py"))}


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources) | {"_native"}
    return {name: imports_of(text, modules) - {name} for name, text in sources.items()}


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a layer to a higher one (unknown modules rank above everything)."""
    top = len(LAYERS)
    return sorted((src, dst) for src, dsts in graph.items() for dst in dsts if RANK.get(dst, top) > RANK.get(src, top))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (Tarjan-free DFS)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def layering_problems(sources: dict[str, str]) -> list[str]:
    graph = import_graph(sources)
    problems = [f"{src} imports {dst}, a higher layer" for src, dst in upward_edges(graph)]
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    problems += [f"{name} is in no layer of tests/test_layers.py" for name in sorted(set(sources) - set(RANK))]
    return problems


# --------------------------------------------------------------------------------------------


def test_package_imports_point_down() -> None:
    sources = package_sources()
    assert {"host", "mm", "fault", "pv", "kvm"} <= set(sources)
    assert layering_problems(sources) == []


def test_every_layer_module_exists() -> None:
    """LAYERS names only real modules (a renamed file must not leave a stale entry behind)."""
    assert set(RANK) - {"_native"} == set(package_sources())


def test_expected_edges_are_seen() -> None:
    """The parser sees the real imports (a graph with no edges would pass vacuously)."""
    graph = import_graph(package_sources())
    assert {"pv", "mm", "fault", "gmap"} <= graph["kvm"]
    assert "fault" in graph["pv"]
    assert "mm" in graph["pv"]
    assert "host" in graph["mm"]
    assert "_native" in graph["host"]
    assert "kvm" not in graph["pv"]  # only under TYPE_CHECKING there


@pytest.mark.parametrize(
    ("module", "line", "edge"),
    [
        ("mm", "from .pv import mmu_notifier_release", ("mm", "pv")),
        ("mm", "from . import pv", ("mm", "pv")),
        ("host", "from .vmm import _register_host", ("host", "vmm")),
        ("host", "import pvfast.vmm", ("host", "vmm")),
        ("gmap", "from pvfast.kvm import Vm", ("gmap", "kvm")),
        ("constants", "from . import __version__", ("constants", "__init__")),
    ],
)
def test_a_reintroduced_upward_import_fails(module: str, line: str, edge: tuple[str, str]) -> None:
    sources = package_sources()
    sources[module] += f"\n{line}\n"
    graph = import_graph(sources)
    assert edge in upward_edges(graph)
    assert any(p.startswith(f"{edge[0]} imports {edge[1]}") for p in layering_problems(sources))


def test_a_function_local_import_counts() -> None:
    sources = package_sources()
    sources["host"] += "\n\ndef spawn():\n    from .mm import Process\n    return Process\n"
    assert ("host", "mm") in upward_edges(import_graph(sources))


def test_type_checking_imports_do_not_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\nimport typing\n"
        "if TYPE_CHECKING:\n    from .kvm import Vm\n"
        "if typing.TYPE_CHECKING:\n    from . import vmm\n"
        "else:\n    from . import errors\n"
    )
    assert imports_of(source, {"kvm", "vmm", "errors"}) == {"errors"}


def test_a_cycle_inside_a_layer_fails() -> None:
    sources = package_sources()
    sources["constants"] += "\nfrom .errors import PvError\n"  # errors imports constants already
    assert any(p.startswith("import cycle:") for p in layering_problems(sources))


def test_a_new_module_needs_a_layer() -> None:
    sources = package_sources()
    sources["newthing"] = "from . import kvm\n"
    assert "newthing is in no layer of tests/test_layers.py" in layering_problems(sources)
