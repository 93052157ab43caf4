"""The structure shows the architecture: sub-packages in layers that import only downwards (function-
level imports included), no two sub-packages that import each other, methods built from one public
API, and short modules, so the next contributor reads one job per file."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods")

#: bottom to top: a module imports only its own layer or lower ones
LAYERS = (
    "harness.errors",  # what every layer raises
    "harness.runtime",  # interrupts, the device, precision, sync counting
    "harness.config",  # the run-config schema, --set parsing, range rules, where outputs go
    "harness.data",  # dataset specs, splits, sampler, decoding, the pipelines
    "harness.tracking",  # the MLflow store, dataset inputs, artifacts, UI links
    "harness.models",  # the method API: backbones, model, injection, losses, registry
    "harness.retrieval",  # kNN metrics, evaluation, zero-shot transfer
    "methods",  # one file per method, built from harness.models alone
    "harness.training",  # resolution, set-up, the loop, selection, checkpoints, resume
    "harness.studies",  # Optuna studies: specs, storage, workers, reproductions
    "harness.reports",  # tables, figures, visualisations of runs
    "harness.bench",  # dmlbench benchmark and the GPU window
    "harness.cli",  # the command line, on top of everything
)
#: what a file in methods/ may import besides harness.models (and the standard library)
METHOD_IMPORTS = ("harness.models", "methods", "torch", "timm", "peft", "numpy")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported(path: Path) -> list[tuple[str, int]]:
    """Every module named by an import anywhere in the file (``from a import b`` gives ``a.b``
    when that is a module, else ``a``), with its line."""
    mods = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [
                (f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module, node.lineno)
                for a in node.names
            ]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body."""
    mods = modules()
    return {name: {t for t, _ in imported(path) if t in mods and t != name} for name, path in mods.items()}


def layer_of(module: str) -> int:
    matches = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    assert matches, f"{module} belongs to no layer of tests/test_architecture.py"
    return max(matches)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {LAYERS[layer_of(m)]}) imports {t} (layer {LAYERS[layer_of(t)]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )


def two_way_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    edges = {(LAYERS[layer_of(m)], LAYERS[layer_of(t)]) for m, targets in graph.items() for t in targets}
    return sorted((a, b) for a, b in edges if a < b and (b, a) in edges)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_layer_imports_only_downwards():
    graph = import_graph()
    assert graph["harness.training.loop"] and "methods.vptsp_g" in graph["methods"]  # the graph is real
    assert upward_imports(graph) == []


def test_no_two_sub_packages_import_each_other_and_no_cycles():
    graph = import_graph()
    assert two_way_pairs(graph) == []
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checks_find_what_they_look_for():
    """Planted: an upward import, a two-way pair, a cycle."""
    planted = {
        "harness.data.specs": {"harness.training.loop"},
        "harness.training.loop": {"harness.data.specs"},
        "harness.config.schema": set(),
    }
    assert upward_imports(planted) == [
        "harness.data.specs (layer harness.data) imports harness.training.loop (layer harness.training)"
    ]
    assert two_way_pairs(planted) == [("harness.data", "harness.training")]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_methods_import_only_the_public_method_api():
    import harness.models

    bad = []
    for path in sorted((REPO / "methods").glob("*.py")):
        for name, line in imported(path):
            top = name.split(".")[0]
            if top in ("harness", "methods", "torch", "timm", "peft", "numpy") and not name.startswith(METHOD_IMPORTS):
                bad.append(f"methods/{path.name}:{line} imports {name}")
            if name.startswith("harness.models."):
                bad.append(f"methods/{path.name}:{line} imports {name}: use harness.models")
    assert bad == []
    used = {
        a.name
        for path in (REPO / "methods").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "harness.models"
        for a in node.names
    }
    assert used <= set(harness.models.__all__), used - set(harness.models.__all__)


def test_methods_are_imported_explicitly_one_by_one():
    """methods/__init__.py imports every method module by name (no importlib discovery), so the
    layer test sees the registry's contents coming from below."""
    init = (REPO / "methods" / "__init__.py").read_text()
    files = sorted(p.stem for p in (REPO / "methods").glob("*.py") if not p.stem.startswith("_"))
    listed = sorted(
        {
            a.name
            for node in ast.walk(ast.parse(init))
            if isinstance(node, ast.ImportFrom) and node.module == "methods"
            for a in node.names
        }
    )
    assert listed == files
    assert "importlib" not in (REPO / "harness" / "models" / "registry.py").read_text()


def test_harness_is_sub_packages_with_short_modules():
    top = sorted(p.name for p in (REPO / "harness").iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "cli.py", "errors.py"], top
    subs = {p.name for p in (REPO / "harness").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {f"harness.{s}" for s in subs} == {layer for layer in LAYERS if layer.count(".") == 1} - {
        "harness.errors",
        "harness.cli",
    }
    for sub in subs:  # each package says what it holds and what it stands on
        assert ast.get_docstring(ast.parse((REPO / "harness" / sub / "__init__.py").read_text())), sub
    long = {
        str(p.relative_to(REPO)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > (400 if p.parts[-2] != "methods" else 450)
    }
    assert not long, long
