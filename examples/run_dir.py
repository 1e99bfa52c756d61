"""The output directory of a run of ``train_swav.py``: checked before anything is created, locked for the run,
written atomically, cleaned of this script's own temporary files only."""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swav_config import ExampleError

from ignite_swav.checkpoint import write_durably

CHECKPOINT_PREFIX = "swav"
LOCK_NAME = ".swav_run.lock"
# Every temporary file this script writes starts with this, so that cleaning up never touches another program's.
TEMP_PREFIX = ".swav_tmp."
_NAME_MAX = 255  # bytes in one path component on Linux and macOS


def check_output_dir_path(path: Path) -> None:
    """Refuse an output directory that cannot hold the run's files, before anything is created."""
    too_long = [part for part in path.parts if len(os.fsencode(part)) > _NAME_MAX]
    if too_long:
        raise ExampleError(
            f"--output-dir has a name of {len(os.fsencode(too_long[0]))} bytes ('{too_long[0][:40]}...'): the "
            f"system allows {_NAME_MAX}"
        )
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == path else f"lies under '{probe}', which is"
        raise ExampleError(f"--output-dir '{path}' {where} a file, not a directory")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise ExampleError(f"--output-dir '{path}' cannot be written (no write permission on '{probe}')")


def check_output_dir(output_dir: Path, resume_from: Path | None) -> None:
    """Refuse an output directory that already holds another run's checkpoints, unless resuming from one."""
    check_output_dir_path(output_dir)
    if not output_dir.is_dir():
        return
    existing = sorted(p.name for p in output_dir.glob("*.pt"))
    if not existing:
        return
    if resume_from is not None and resume_from.resolve().parent == output_dir.resolve():
        return  # continuing the run whose checkpoints these are
    raise ExampleError(
        f"--output-dir '{output_dir}' already holds checkpoints of another run ({', '.join(existing[:3])}"
        f"{', ...' if len(existing) > 3 else ''}): pass --resume-from one of them to continue that run there, or "
        "choose another --output-dir"
    )


class OutputDirLock:
    """``output_dir/.swav_run.lock`` held for the run, so that a second run pointed at the same directory is
    refused instead of interleaving its checkpoints.

    A POSIX record lock (``fcntl.lockf``): the system releases it when the process ends however it ends, and,
    unlike ``flock``, the DataLoader workers a process forks do not inherit it, so a run killed with SIGKILL can be
    resumed at once. The file names its holder (process and host) for the message; one naming another host is
    refused, as that host's process cannot be checked (delete the file if that run is really gone). The file is
    opened without following links, and :meth:`verify` (before every write) stops the run when it was removed or
    replaced: a second run could then have taken the directory.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_NAME
        self.inode: int | None = None
        self._descriptor: int | None = None

    def __enter__(self) -> OutputDirLock:
        import fcntl  # POSIX: the example's lock is for Linux and macOS

        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExampleError(f"--output-dir '{self.output_dir}' cannot be created: {error.strerror}") from None
        host = socket.gethostname()
        while True:
            descriptor = self._open()
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(descriptor)
                    raise
                pid, owner_host = _owner(descriptor)
                os.close(descriptor)
                raise ExampleError(
                    f"--output-dir '{self.output_dir}' is in use by another run (process {pid} on {owner_host or '?'}"
                    f", lock file {self.path}): wait for it to end or choose another --output-dir"
                ) from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder removed the file as we opened it: lock the new one
                os.close(descriptor)
                continue
            pid, owner_host = _owner(descriptor)
            if pid is not None and owner_host != host:
                os.close(descriptor)
                raise ExampleError(
                    f"--output-dir '{self.output_dir}' is in use by another run on another host (process {pid} on "
                    f"{owner_host}, lock file {self.path}): wait for it to end or choose another --output-dir; if "
                    "that run is gone, delete the lock file"
                )
            if pid is not None:
                print(f"taking over {self.path}: process {pid} that held it is not running", flush=True)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n{host}\n".encode(), 0)
            self._descriptor, self.inode = descriptor, os.fstat(descriptor).st_ino
            return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ExampleError(
                    f"the lock file {self.path} is a symbolic link: remove it (it is not ours)"
                ) from None
            if error.errno == errno.EISDIR:
                raise ExampleError(f"the lock file {self.path} is a directory: remove it (it is not ours)") from None
            raise ExampleError(f"the lock file {self.path} cannot be opened: {error.strerror}") from None

    def __exit__(self, *exc_info: Any) -> None:
        if self._descriptor is None:
            return
        try:
            if verify_lock(self.path, self.inode, raise_error=False, holder=os.getpid()):
                self.path.unlink(missing_ok=True)  # while still locked, so that no start locks the old file
        finally:
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None


def _owner(descriptor: int) -> tuple[int | None, str]:
    # read through the held descriptor: closing any other descriptor of the file would release a POSIX lock
    try:
        pid, host = (os.pread(descriptor, 4096, 0).decode(errors="replace").split("\n") + ["", ""])[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def verify_lock(path: Path, inode: int | None, raise_error: bool = True, holder: int | None = None) -> bool:
    """Whether the lock file is still the one this run holds (the same file, naming ``holder``, the process that
    took it, when given); raises ExampleError (``raise_error``) when it was removed, replaced or taken over, as
    another run could now write into the directory too."""
    if inode is None:
        return True
    try:
        current = os.stat(path, follow_symlinks=False).st_ino
        named = path.read_text(errors="replace").split("\n", 1)[0].strip() if holder is not None else None
    except FileNotFoundError:
        current, named = None, None
    if current == inode and (holder is None or named == str(holder)):
        return True
    if raise_error:
        raise ExampleError(
            f"the lock file {path} was removed, replaced or taken over while this run held it: another run may be "
            "writing into the same --output-dir; stopped before writing (resume from the newest checkpoint once alone)"
        )
    return False


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary_path)`` then rename over ``path`` (the library's durable write, with this script's
    temporary names): a reader sees the old file or the new one, never a part."""
    write_durably(path, write, TEMP_PREFIX)


_TEMPORARY = re.compile(rf"^{re.escape(TEMP_PREFIX)}.+\.tmp$")


def remove_temporary_files(output_dir: Path) -> None:
    """Remove the temporary files that a killed or failed run of this script left in ``output_dir`` (its lock
    held, after every check passed): only this script's, never another program's."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _checkpoint_iteration(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def keep_newest_checkpoints(output_dir: Path, count: int) -> None:
    """Delete this script's checkpoints in ``output_dir`` but the ``count`` newest (by iteration)."""
    saved = sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}_checkpoint_*.pt"), key=_checkpoint_iteration)
    for old in saved[:-count]:
        old.unlink(missing_ok=True)


def free_port() -> int:
    """A TCP port free on this machine now, for the processes of one run to meet on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
