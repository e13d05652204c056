"""The layers of docs/ARCHITECTURE.md hold in the source: imports only point down (lazy and type-checking imports
included), no module or package import cycle, one training loop, seeding only through train/seeding.py."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fmprobe"

# Low to high; a module may import from its own layer's packages (without cycles) and from lower layers.
LAYERS = [
    {"errors"},
    {"atomic", "config", "distributed", "forks"},
    {"devices"},
    {"backbones"},
    {"data"},
    {"features"},
    {"heads"},
    {"evaluate"},
    {"train"},
    {"probes"},
    {"adapt"},
    {"diagnostics"},
    {"report", "tracking", "standin"},
    {"experiments"},
    {"demo"},
    {"cli"},
    {"__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ["fmprobe", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every fmprobe module each module imports, wherever the import statement stands."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    packages = {_package(m) for m in _modules()} - {"fmprobe"}
    assert packages <= set().union(*LAYERS), packages - set().union(*LAYERS)


def test_imports_point_down():
    layer = {p: i for i, group in enumerate(LAYERS) for p in group}
    modules = _modules()
    upward = [f"{a} -> {b}" for a, targets in _imports(modules).items() for b in targets
              if _package(b) != "fmprobe" and _package(a) != "fmprobe" and layer[_package(b)] > layer[_package(a)]]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules_or_packages():
    graph = _imports(_modules())
    assert not _cycles(graph)
    packages: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        packages[_package(a)] |= {_package(b) for b in targets if _package(b) != _package(a)}
    assert not _cycles(packages)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not _cycles({"a": {"b"}, "b": {"c"}})


def test_one_training_loop_and_seeding_in_one_place():
    backward = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if ".backward(" in p.read_text()]
    assert backward == ["train/core.py"]
    global_seed = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "torch.manual_seed(" in p.read_text()]
    assert global_seed == ["train/seeding.py"]
