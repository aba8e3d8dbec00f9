"""The project's import graph: layers that only import downwards, and no cycle.

Every import of the project's packages is read from the source (``ast``), function-local
ones included; only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "search_spaces", "workers", "dashboards")

# workers/ by layer, bottom first; a module may import its own layer and those below.
# The foundation (standard library only) may be imported by every layer.
WORKERS_LAYERS = ("foundation", "zoo", "codec", "compress", "jobs", "search")
FOUNDATION = {"workers", "workers.errors", "workers.entrypoints", "workers.envguard"}
RANK = {"foundation": 0, "zoo": 1, "codec": 1, "compress": 2, "jobs": 3, "search": 4}
ORCHESTRATION = ("ray", "optuna", "mlflow")  # imported by the search layer only
# What workers may import of the service: the pure contract modules anywhere, and the
# job store (with the service's process helpers) through one module of the search layer.
CONTRACT = {
    "service.spec",
    "service.settings",
    "service.secrets",
    "service.tasks",
    "service.weights",
}
STORE_INTERFACE = "workers.search.jobstore"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The project module ``name`` loads (a package's ``__init__``), or None if outside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Absolute names ``module`` imports at run time (project modules resolved to the
    module or package actually loaded; others as written)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.add(sub if sub in MODULES else base)
    return {(_resolve(n) or n) if n.split(".")[0] in PACKAGES else n for n in names}


GRAPH = {m: {n for n in imports(m) if n in MODULES and n != m} for m in MODULES}


def layer(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    assert parts[0] == "workers", f"{module} is not in workers/"
    assert len(parts) >= 2, f"{module} lies in no layer of workers/"
    assert parts[1] in RANK, f"{module}: workers/{parts[1]}/ is not a layer"
    return parts[1]


WORKERS = sorted(m for m in MODULES if m.startswith("workers"))


@pytest.mark.parametrize("module", WORKERS)
def test_workers_modules_import_only_their_layer_and_below(module: str) -> None:
    mine = layer(module)
    upward = sorted(
        n for n in GRAPH[module] if n.startswith("workers") and RANK[layer(n)] > RANK[mine]
    )
    assert not upward, f"{module} ({mine}) imports {upward} from layers above it"
    if mine in ("zoo", "codec"):  # the two bottom layers know nothing of each other
        other = "codec" if mine == "zoo" else "zoo"
        assert not [n for n in GRAPH[module] if n.startswith(f"workers.{other}")]


@pytest.mark.parametrize("module", WORKERS)
def test_only_the_search_layer_imports_ray_optuna_or_mlflow(module: str) -> None:
    if layer(module) == "search":
        return
    heavy = sorted(n for n in imports(module) if n.split(".")[0] in ORCHESTRATION)
    assert not heavy, f"{module} ({layer(module)}) imports {heavy}"


@pytest.mark.parametrize("module", WORKERS)
def test_workers_reach_the_service_through_the_contract_and_one_store_interface(
    module: str,
) -> None:
    service = {n for n in GRAPH[module] if n.startswith("service")}
    allowed = CONTRACT | ({"service.store", "service.flusher", "service.procs"}
                          if module == STORE_INTERFACE else set())  # fmt: skip
    assert service <= allowed, f"{module} imports {sorted(service - allowed)} of the service"


def test_contract_modules_import_no_other_service_module() -> None:
    for module in CONTRACT:
        inner = {n for n in GRAPH[module] if n.startswith("service")} - CONTRACT
        assert not inner, f"{module} is contract but imports {sorted(inner)}"


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_function_local_imports_included() -> None:
    assert _cycles() == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up edge makes a cycle and an upward import."""
    GRAPH["workers.zoo.nets"].add("workers.search.driver")
    try:
        assert any("workers.zoo.nets" in c for c in _cycles())
        with pytest.raises(AssertionError, match="from layers above it"):
            test_workers_modules_import_only_their_layer_and_below("workers.zoo.nets")
    finally:
        GRAPH["workers.zoo.nets"].discard("workers.search.driver")
