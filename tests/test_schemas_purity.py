"""`schemas` is the pure wire contract: no sockets, files, threads or processes (ADR 0001)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
FORBIDDEN_MODULES = {
    "asyncio", "io", "os", "pathlib", "shutil", "socket", "sqlite3", "ssl", "subprocess",
    "tempfile", "threading", "multiprocessing", "paho", "edge_node", "edgewise",
    "cloud_worker", "broker_bridge", "logging", "time",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval"}
CLOCK_ALLOWED = {"ids.py"}  # ids embed the time: the one clock read (schemas/__init__.py)


def _modules() -> list[Path]:
    files = sorted(SCHEMAS.glob("*.py"))
    assert len(files) > 5
    return files


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_schema_module_touches_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: set[str] = set()
    called: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(node.func.id)
    forbidden = FORBIDDEN_MODULES - ({"time"} if path.name in CLOCK_ALLOWED else set())
    assert not imported & forbidden, f"{path.name} imports {imported & forbidden}"
    assert not called & FORBIDDEN_CALLS, f"{path.name} calls {called & FORBIDDEN_CALLS}"
