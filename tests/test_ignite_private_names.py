"""Every private name of Ignite the package touches, listed: an import of a private name, a private method of an
Ignite class that a class of ours overrides or calls, a private attribute an Ignite base class defines. A new one
fails here until it is added knowingly; one that the installed Ignite lacks (a new release renamed it) fails too.
setup.cfg bounds pytorch-ignite below its next minor release, and CI runs the suite on the floor (make test-min)
and on the newest release the bound admits (make test)."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import ignite
from ignite.engine import Engine

PACKAGE = Path(__file__).resolve().parents[1] / "ignite_swav"

# name -> where we use it and why it stays
EXPECTED = {
    "import _prepare_batch": "evaluation.py, probe.py: Ignite's default (x, y) batch preparation",
    "_ResumableDeterministicEngine._setup_engine": "restores the random state after the first batch of a resumed epoch",
    "_ResumableDeterministicEngine._init_run": "saves every rank's run seed when the run starts",
    "_ResumableDeterministicEngine._get_data_length": "the epoch length of the data, in _setup_engine",
    "KNNAccuracy._device": "Metric's device, where the counts live (as Ignite's own metrics use it)",
    "KNNAccuracy._state_dict_all_req_keys": "Serializable's required keys",
    "OnlineLinearProbe._state_dict_all_req_keys": "Serializable's required keys",
    "SwAVHealthMonitor._state_dict_all_req_keys": "Serializable's required keys",
    "SwAVQueue._state_dict_all_req_keys": "Serializable's required keys",
    "SwAVQueueHandler._state_dict_all_req_keys": "Serializable's required keys",
    "SwAVQueueGuard._state_dict_all_req_keys": "Serializable's required keys",
    "Engine._dataloader_iter": "queue_guard.py: after going back, the next epoch starts a new pass over the data",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _names_defined_by(cls: type) -> set[str]:
    """The private names an Ignite class defines: its methods and class attributes, and the attributes its methods
    assign on ``self``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        for target in getattr(node, "targets", []) + [getattr(node, "target", None)]:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
            elif isinstance(target, ast.Name):
                names.add(target.id)
    return {n for n in names if _private(n)}


def _is_self(node: ast.expr) -> bool:
    """``self`` or ``super()``: a class's own names, counted per class below."""
    is_super = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    return is_super or (isinstance(node, ast.Name) and node.id == "self")


def touched_private_names(folder: Path = PACKAGE, package: str = "ignite_swav.") -> dict[str, type | None]:
    """``{"import _name" or "Class._name": the Ignite class that defines it (None for an import)}`` for the modules
    of ``folder`` (imported as ``package + stem``)."""
    found: dict[str, type | None] = {}
    engine_names = {name: base for base in reversed(Engine.__mro__[:-1]) for name in _names_defined_by(base)}
    for path in sorted(folder.glob("*.py")):
        module = importlib.import_module(f"{package}{path.stem}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ignite":
                found.update({f"import {a.name}": None for a in node.names if _private(a.name)})
            if isinstance(node, ast.Attribute) and node.attr in engine_names and not _is_self(node.value):
                found[f"Engine.{node.attr}"] = engine_names[node.attr]  # on an engine handed to our code
            if not isinstance(node, ast.ClassDef):
                continue
            cls = getattr(module, node.name, None)
            bases = [b for b in getattr(cls, "__mro__", ()) if b.__module__.split(".")[0] == "ignite"]
            defined = {name: base for base in reversed(bases) for name in _names_defined_by(base)}
            for inner in ast.walk(node):
                name = (
                    inner.attr
                    if isinstance(inner, ast.Attribute)
                    else getattr(inner, "name", getattr(inner, "id", None))
                )
                if name in defined:
                    found[f"{node.name}.{name}"] = defined[name]
    return found


def test_the_package_touches_only_the_listed_private_names_of_ignite():
    assert sorted(touched_private_names()) == sorted(EXPECTED)


def test_every_listed_private_name_exists_in_the_installed_ignite():
    from ignite import engine

    for key, owner in touched_private_names().items():
        name = key.split(".")[-1].removeprefix("import ")
        where = engine if owner is None else owner
        assert hasattr(where, name) or name in _names_defined_by(owner), f"{key}: gone from ignite {ignite.__version__}"


def test_the_check_would_catch_a_new_one(tmp_path: Path, monkeypatch):
    (tmp_path / "spy_module.py").write_text(
        "from ignite.engine import Engine, _prepare_batch\n\n"
        "class Spy(Engine):\n"
        "    def _fire_event(self, *args, **kwargs):\n"
        "        return super()._fire_event(*args, **kwargs)\n\n"
        "    def run_quietly(self):\n"
        "        return self._process_function\n\n"
        "def rewind(engine):\n"
        "    engine._dataloader_iter = None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = touched_private_names(tmp_path, "")
    expected = ["Engine._dataloader_iter", "Spy._fire_event", "Spy._process_function", "import _prepare_batch"]
    assert sorted(found) == expected
