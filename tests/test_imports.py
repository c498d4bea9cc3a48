"""Imports go one way: no module of the package imports, directly or through others, a module that imports it back
(imports inside functions count too: a lazy import is still a dependency), and the layers keep their order."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unialignment"
# Each folder may import only from folders before it (and from itself); unialignment/*.py modules are shared.
LAYERS = [
    {"models", "diffusion", "alignment"},
    {"frozen"},
    {"data"},
    {"pipelines"},
    {"training"},
    {"evaluation", "toy", "benchmark"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the submodule; `from module import name` the module
                targets.update(
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                )
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member: the import cycles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_no_module_is_part_of_an_import_cycle():
    assert strongly_connected(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_layers_import_only_from_earlier_layers():
    layer_of = {folder: number for number, layer in enumerate(LAYERS) for folder in layer}
    assert set(layer_of) == {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    wrong = []
    for module, targets in import_graph().items():
        source = _folder(module)
        for target in targets:
            folder = _folder(target)
            if source is not None and folder is not None and layer_of[folder] > layer_of[source]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []
