"""The package's shape, enforced: imports only go down the layers of docs/architecture.md, and no function in
`mutransfer/` is longer than 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mutransfer"
MAX_FUNCTION_LINES = 60
LEAVES = {"errors", "typed_config", "tags", "netutil", "logs", "folder_lock", "process"}
# what each part may import, besides itself and the leaf modules
MAY_IMPORT = {
    "models": set(),
    "data": set(),
    "train": {"models", "data"},
    "launch": {"train", "models", "data"},
    "study": {"launch", "train", "models", "data"},
    "cli": {"models", "data", "train", "launch", "study"},
}
MAY_IMPORT.update({leaf: set() for leaf in LEAVES | {"__init__"}})


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_parts(source: str, own: tuple[str, ...]) -> set[str]:
    """The parts of mutransfer that the module `own` (its path parts below mutransfer/) imports, absolute or
    relative, at module level or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(own[:-1])[: max(0, len(own) - node.level)]
            names = [".".join(base + [node.module or ""])]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mutransfer."):
            names = [node.module.removeprefix("mutransfer.")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("mutransfer.") for a in node.names if a.name.startswith("mutransfer.")]
        parts.update(name.split(".")[0] for name in names if name.split(".")[0])
    return parts


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path) -> None:
    part = _part(path)
    assert part in MAY_IMPORT, f"{part} is a new part of the package: place it in MAY_IMPORT and the docs"
    upward = _imported_parts(path.read_text(), path.relative_to(PACKAGE).with_suffix("").parts) - MAY_IMPORT[part] - LEAVES - {part}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}, above {part} in the layers"


def test_the_layer_check_sees_upward_imports_of_every_form() -> None:
    source = ("import mutransfer.study.sweep\n"
              "def f():\n    from mutransfer.train.engine import build_engine\n    from ..launch import slurm\n"
              "from .layers import Attention\n")
    assert _imported_parts(source, ("models", "vit")) == {"study", "train", "launch", "models"}


def _long_functions() -> list[str]:
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_60_lines() -> None:
    assert not _long_functions(), "split these:\n" + "\n".join(_long_functions())


MAX_MODULE_LINES = 400


def test_no_module_is_longer_than_400_lines() -> None:
    long = [f"{p.relative_to(PACKAGE)} ({n} lines)" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "split these into modules of one job each:\n" + "\n".join(long)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The mutransfer modules `path` imports (at module level or inside functions); `from pkg import sub`
    counts as importing the submodule `pkg.sub` when there is one."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return {name for name in found if name in known and name != own}


def _import_cycles() -> list[list[str]]:
    modules = {_module_name(p): p for p in _modules()}
    graph = {name: _imported_modules(path, set(modules)) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycle() -> None:
    """Also through imports inside functions: a lazy import hides a cycle from Python, not from a reader."""
    cycles = [c for c in _import_cycles() if not any(m.rpartition(".")[0] == n for n, m in zip(c, c[1:]))]
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


ARCHITECTURE_DOC = PACKAGE.parent / "docs" / "architecture.md"


def test_docs_architecture_lists_every_module_and_nothing_that_is_gone() -> None:
    """Its table of modules names each module by its path under mutransfer/ (`data/tars.py`)."""
    import re

    text = ARCHITECTURE_DOC.read_text()
    modules = {str(p.relative_to(PACKAGE)) for p in _modules()}
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, flags=re.M))
    assert not modules - listed, f"add to docs/architecture.md's table of modules: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/architecture.md lists modules that are gone: {sorted(listed - modules)}"
