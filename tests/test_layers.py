"""No module imports from a layer above its own (read from the source with `ast`, nothing is imported).

Lowest first. A module may import its own layer's siblings only within its own package (``net`` from
``net``), and any layer below. Imports inside functions count too: a lazy import upward is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "neuranet"

LAYERS: list[set[str]] = [
    {"__init__", "config", "errors", "tasks", "allocator", "keyfiles"},
    {"runner"},
    {"protocol"},
    {"net"},
    {"storage", "pipeline", "forecast", "jobs"},  # jobs: the compute market's pure cores (archives, matching, lifecycle) and the sandbox
    {"api_models", "api_requests"},  # the REST bodies: the server takes and answers with them, clients build and read them
    {"agent", "server"},
    {"client"},
    {"ui", "fabric"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(path: Path) -> str:
    """The top-level unit a file belongs to: its package under neuranet/, or its module's name."""
    parts = path.relative_to(ROOT).parts
    name = parts[0] if len(parts) > 1 else path.stem
    return name


def _is_unit(name: str) -> bool:
    return (ROOT / f"{name}.py").exists() or (ROOT / name).is_dir()


def _imported_units(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "neuranet":  # from neuranet import x: x is the unit when it is a module
                names = [f"neuranet.{a.name}" if _is_unit(a.name) else "neuranet" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "neuranet":
                name = parts[1] if len(parts) > 1 else "__init__"
                out.add(name)
    return out


def _upward_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = _unit(path)
        own = LAYER_OF[unit]
        for other in sorted(_imported_units(ast.parse(path.read_text(), str(path)))):
            if other == unit or other == "__init__":
                continue
            theirs = LAYER_OF.get(other)
            if theirs is None or theirs >= own:
                found.append(f"{path.relative_to(ROOT.parent)} imports neuranet.{other}")
    return found


def test_every_unit_has_a_layer() -> None:
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_no_module_imports_upward_or_sideways() -> None:
    assert _upward_imports() == []


def test_the_check_sees_an_upward_import() -> None:
    tree = ast.parse("def f():\n    from neuranet.agent.runtime import Agent\nfrom neuranet import client, __version__\n")
    assert _imported_units(tree) == {"agent", "client", "__init__"}
