"""The shape of the house: no module of the package reaches into another's private names, and the example reads
top-down in short functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_imports(folder: Path, package: str) -> list[str]:
    """``module imports _name from module`` for every import of a private name from a non-private module."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            local = node.module.startswith(f"{package}.") or (package == "" and node.level == 0)
            leaf = node.module.split(".")[-1]
            if local and not leaf.startswith("_"):
                found += [
                    f"{path.name} imports {a.name} from {node.module}" for a in node.names if a.name.startswith("_")
                ]
    return found


def test_no_module_of_the_package_imports_a_private_name_of_another():
    assert private_imports(ROOT / "ignite_swav", "ignite_swav") == []


def test_the_private_import_check_would_catch_one(tmp_path: Path):
    (tmp_path / "a.py").write_text("from ignite_swav.engine import _secret\n")
    assert private_imports(tmp_path, "ignite_swav") == ["a.py imports _secret from ignite_swav.engine"]


def test_the_example_is_short_functions_and_a_main_file_of_at_most_350_lines():
    examples = ROOT / "examples"
    assert len((examples / "train_swav.py").read_text().splitlines()) <= 350
    long = []
    for path in sorted(examples.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
