"""The package's layering reads one way: the core path knows nothing of DTensor, and no two modules import
each other (imports inside functions included: a lazy import hides a circle, it does not remove it)."""

import ast
from pathlib import Path

import lorafuse

PACKAGE = Path(lorafuse.__file__).parent

#: The layer, its functional form and autograd, the backends and the checks: what every call runs through.
CORE = ("checks", "dispatch", "function", "layer", "ops", "reference", "torch_backend")


def _module_name(file: Path) -> str:
    parts = ("lorafuse",) + file.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(file): file for file in PACKAGE.rglob("*.py")}


def _imports(name: str):
    """Every module `name` imports, anywhere in its file, as absolute names."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (base + "." + node.module if node.module else base) if node.level else node.module
            # "from . import ops" imports the module lorafuse.ops; "from .config import X" the module lorafuse.config.
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            yield from submodules or [target]


def _package_graph():
    """lorafuse module -> the lorafuse modules it imports. A module's enclosing packages are left out: Python
    has them imported before the module itself, and their __init__ only re-exports."""
    graph = {}
    for name in MODULES:
        graph[name] = {target for target in _imports(name)
                       if target in MODULES and target != name and not name.startswith(target + ".")}
    return graph


def test_the_core_path_imports_nothing_distributed():
    for module in CORE:
        distributed = [target for target in _imports(f"lorafuse.{module}")
                       if target.startswith(("torch.distributed", "lorafuse.distributed"))]
        assert not distributed, f"lorafuse.{module} imports {distributed}"


def test_no_two_modules_import_each_other_in_a_circle():
    graph = _package_graph()
    assert graph["lorafuse.distributed.sharded"] >= {"lorafuse.function"}  # the graph sees what it should
    state = {}  # module -> "open" while on the current path, "done" after

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
