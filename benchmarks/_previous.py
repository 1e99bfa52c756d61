"""Load ignite_swav as it was at an earlier git commit, beside the current one, to time both in one process."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parents[1]


def load_package_at(commit: str) -> ModuleType:
    """``ignite_swav`` of ``commit`` (extracted with ``git archive`` into a temporary folder), imported under its
    own name while the current package's modules are set aside, then both restored: the returned module and
    its classes keep working beside the current ones."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "ignite_swav"], cwd=REPOSITORY, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"--against {commit}: git archive failed ({archive.stderr.decode().strip()})")
    folder = tempfile.mkdtemp(prefix=f"ignite_swav_{commit}_")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    current = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "ignite_swav"}
    for name in current:
        del sys.modules[name]
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("ignite_swav")
    finally:
        sys.path.remove(folder)
        for name in [n for n in sys.modules if n.split(".")[0] == "ignite_swav"]:
            del sys.modules[name]
        sys.modules.update(current)
