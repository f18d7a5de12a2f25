"""The package layers: who may import whom, no import circle, no method key read outside contracts.

Layers, bottom up (README, "Layout"): ``compression`` (pure codecs and quantizers) < ``core``
(config schema, settings, seeding, wire state, results, checkpoints) < ``contracts`` (what a
method's client and strategy agree on) < ``clients`` | ``strategies`` (methods; never each
other) < ``fl_app`` (Flower wiring, registries, data, models) < ``tools`` (launcher, harness,
in-process driver, agent training) < ``deploy`` < ``benchmarks``. A module imports its own
package and lower layers only. Imports inside functions count: a lazy import hides a circle.
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS: tuple[tuple[str, ...], ...] = (
    ("compression",),
    ("core",),
    ("contracts",),
    ("clients", "strategies"),
    ("fl_app",),
    ("tools",),
    ("deploy",),
    ("benchmarks",),
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
METHOD_PREFIXES = (
    "fedbif",
    "fedbat",
    "cuq",
    "lbi",
    "signsgd",
    "fedpaq",
    "qsgd",
    "feddq",
    "dadaquant",
)


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(root: Path) -> dict[str, set[str]]:
    """module -> first-party modules it imports (anywhere in the file)."""
    modules = {
        module_name(root, path): path
        for package in RANK
        for path in sorted((root / package).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                # ``from pkg import module`` imports a module, not only a name.
                targets.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if f"{node.module}.{alias.name}" in modules
                )
        graph[name] = {t for t in targets if t.split(".")[0] in RANK and t in modules}
    return graph


def layer_violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Imports of a higher layer, or between clients and strategies."""
    problems = []
    for source, targets in graph.items():
        mine = source.split(".")[0]
        for target in targets:
            theirs = target.split(".")[0]
            if theirs == mine:
                continue
            if RANK[theirs] >= RANK[mine]:
                problems.append(f"{source} imports {target} ({theirs} is not below {mine})")
    return sorted(problems)


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(RANK), "give a new package a layer in LAYERS and the README"


def test_no_import_reaches_up_or_across_methods():
    assert layer_violations(first_party_imports(ROOT)) == []


def test_no_import_circle():
    assert import_cycles(first_party_imports(ROOT)) == []


def test_clients_and_strategies_never_import_each_other():
    graph = first_party_imports(ROOT)
    crossing = [
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if {source.split(".")[0], target.split(".")[0]} == {"clients", "strategies"}
    ]
    assert crossing == []


def test_a_planted_back_import_is_caught(tmp_path):
    tree = tmp_path / "tree"
    for package in RANK:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("*.pyc"))
    config = tree / "core" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _late():\n    from fl_app import methods\n")
    graph = first_party_imports(tree)
    assert "core.config imports fl_app.methods (fl_app is not below core)" in layer_violations(
        graph
    )
    assert any(
        "core.config" in cycle and "fl_app.methods" in cycle for cycle in import_cycles(graph)
    )


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, [["a"]]),
    ],
)
def test_cycle_finder_on_hand_made_graphs(graph, expected):
    assert import_cycles(graph) == expected


def test_method_keys_are_read_only_through_contracts():
    """No ``cfg["fedbif-..."]``-style read outside ``contracts`` (settings are typed there)."""
    prefixes = "|".join(METHOD_PREFIXES)
    pattern = re.compile(rf"""\[\s*["'](?:{prefixes})-""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in RANK
        if package != "contracts"
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
