"""The rooms' dependency directions (docs/CONTRACTS.md, "Rooms"), read from every module's AST.

pipelines -> training -> store -> cxrcf and serving -> store -> cxrcf; a wrong-way arrow (serving
reaching into training, the core into an outer room, ...) fails here rather than in review. The one
exception is the front door: `cxrcf/cli.py` may import outer rooms, but only inside its command
functions, so that `import cxrcf` stays light and each arrow is a visible import statement.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("cxrcf", "store", "training", "serving", "pipelines")
ALLOWED = {
    "cxrcf": {"cxrcf"},
    "store": {"cxrcf", "store"},
    "training": {"cxrcf", "store", "training"},
    "serving": {"cxrcf", "store", "serving"},
    "pipelines": {"cxrcf", "store", "training", "pipelines"},
}
FRONT_DOOR = Path("cxrcf/cli.py")


def imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level?) of every import in a module."""
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(name.split(".")[0], node.lineno, id(node) not in nested) for name in names]
    return out


def modules() -> list[Path]:
    return sorted(p.relative_to(ROOT) for room in ROOMS for p in (ROOT / room).rglob("*.py"))


def wrong_way(path: Path) -> list[str]:
    room = path.parts[0]
    bad = []
    for top, line, module_level in imports(ast.parse((ROOT / path).read_text(), str(path))):
        if top not in ROOMS or top in ALLOWED[room]:
            continue
        if path == FRONT_DOOR and not module_level:
            continue  # the CLI's command dispatch: lazy, inside a function
        bad.append(f"{path}:{line}: {room} -> {top}")
    return bad


def test_every_room_is_walked():
    found = {p.parts[0] for p in modules()}
    assert found == set(ROOMS)
    assert len(modules()) > 60


@pytest.mark.parametrize("room", ROOMS)
def test_imports_point_inward(room):
    bad = [b for p in modules() if p.parts[0] == room for b in wrong_way(p)]
    assert not bad, "wrong-way imports:\n" + "\n".join(bad)


def test_the_walker_sees_lazy_and_top_level_imports():
    tree = ast.parse("import os\nfrom pipelines import registry\n\ndef f():\n    from serving.app import x\n")
    assert imports(tree) == [("os", 1, True), ("pipelines", 2, True), ("serving", 5, False)]


def unresolved(path: Path) -> list[str]:
    """Project imports of `path` (function-local ones too) that name a module or attribute that does not exist.

    A function-local import is only executed when its function runs; after a module moves rooms, a stale
    one fails in whichever stage calls it, long after review."""
    import importlib

    bad = []
    for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [(node.module, a.name) for a in node.names if a.name != "*"]
        else:
            continue
        for module, name in targets:
            if module.split(".")[0] not in ROOMS:
                continue
            try:
                mod = importlib.import_module(module)
                if name is not None and not hasattr(mod, name):
                    importlib.import_module(f"{module}.{name}")
            except ImportError as err:
                bad.append(f"{path}:{node.lineno}: {module}{'.' + name if name else ''}: {err}")
    return bad


@pytest.mark.parametrize("room", ROOMS)
def test_every_project_import_resolves(room):
    bad = [b for p in modules() if p.parts[0] == room for b in unresolved(p)]
    assert not bad, "imports that do not resolve:\n" + "\n".join(bad)
