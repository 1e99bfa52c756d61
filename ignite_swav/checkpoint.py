"""Loading checkpoints safely: verified files, and a resume that loads every object or none."""

from __future__ import annotations

import copy
import errno
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from ignite import distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.handlers.param_scheduler import BaseParamScheduler
from torch import Tensor, nn
from torch.optim import Optimizer

from ignite_swav._pickle_scan import referenced_callables
from ignite_swav._state_checks import check_engine_state, check_module_state, check_optimizer_state
from ignite_swav._validation import check_int

__all__ = ["DurableDiskSaver", "load_checkpoint_file", "load_objects", "write_durably"]


def _check_archive(path: Path) -> None:
    # torch.load does not verify the CRC-32 that torch.save writes for every record of its zip archive, so a
    # flipped byte in tensor data would load silently as a wrong weight; zipfile checks them all.
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load reports what it is
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as error:
        # NotImplementedError: zipfile's answer to a damaged compression-method field
        raise ValueError(f"checkpoint file '{path}' cannot be read, it is truncated or corrupted ({error})") from None
    if damaged is not None:
        raise ValueError(f"checkpoint file '{path}' is corrupted: the data of '{damaged}' does not match its checksum")


# What torch.save itself writes into a checkpoint's pickle; any other callable in a refused file is named.
_TORCH_SAVE_CALLABLES = ("torch.", "collections.OrderedDict")


def _referenced_callables(path: Path) -> list[str]:
    """The callables the pickles of a checkpoint file refer to, read without running anything and without reading
    large arguments (streamed), for the message of a file that torch's weights-only reader refused."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if member is None:
                return []
            with archive.open(member) as stream:
                return referenced_callables(stream)
    with open(path, "rb") as stream:
        return referenced_callables(stream)


def load_checkpoint_file(path: str | Path) -> Any:
    """Load a checkpoint file with ``torch.load(weights_only=True)``; never runs code stored in the file.

    Raises:
        TypeError: ``path`` is not a path.
        FileNotFoundError: no file at ``path``.
        ValueError: the path is not a regular file (a directory, a FIFO, a loop of links); the file is empty,
            truncated or corrupted (the checksum of every record is verified), or holds objects other than
            tensors, numbers, strings and containers of them (a pickle that would run code is refused, not
            executed, and the refused callable is named).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from ignite_swav import load_checkpoint_file
        >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> torch.save({"model": {"weight": torch.ones(2)}, "epoch": 3}, path)
        >>> load_checkpoint_file(path)["epoch"]
        3
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a pathlib.Path naming a checkpoint file, got {type(path).__name__}")
    path = Path(path)
    try:
        exists, regular = path.exists(), path.is_file()
    except OSError as error:  # a loop of symbolic links, a name too long
        raise ValueError(f"checkpoint file '{path}' cannot be read ({error.strerror or error})") from None
    if not exists:
        if path.is_symlink():
            raise ValueError(f"checkpoint file '{path}' is a symbolic link to nothing (or a loop of links)")
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if not regular:
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, a socket or a device)"
        raise ValueError(f"checkpoint file '{path}' is {kind}: give the path of a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file '{path}' is empty (0 bytes): it was not written completely")
    _check_archive(path)
    try:
        with warnings.catch_warnings():
            # a pickle protocol other than torch's: refused below if it refers to anything but tensors
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(
            f"checkpoint file '{path}' cannot be read, it is truncated or corrupted ({error.strerror or error})"
        ) from None
    except Exception as error:
        message = str(error)
        # torch's weights-only unpickler names the callable it refused: "GLOBAL module.name" or "global module.name"
        refused = re.search(r"GLOBAL (\S+)|[Uu]nsupported global: (?:GLOBAL )?(\S+)", message)
        name = (refused.group(1) or refused.group(2)).rstrip(".,") if refused else None
        if isinstance(error, pickle.UnpicklingError) and not name:
            unsafe = [n for n in _referenced_callables(path) if not n.startswith(_TORCH_SAVE_CALLABLES)]
            name = unsafe[0] if unsafe else None
        if isinstance(error, pickle.UnpicklingError) and name and re.fullmatch(r"[\w.]+", name):
            raise ValueError(
                f"checkpoint file '{path}' refers to '{name}', which is not a tensor or a number: the "
                "file was refused without running any of its code (only files of tensors and numbers, as ignite's "
                "Checkpoint writes them, are accepted)"
            ) from None
        # torch's own text advises loading with weights_only=False, which would run the file's code: never quoted
        detail = "" if "weights_only" in message else f": {message.splitlines()[0][:200]}" if message else ""
        raise ValueError(
            f"checkpoint file '{path}' cannot be read, it is truncated or corrupted, or not a file of tensors and "
            f"numbers as torch.save writes them ({type(error).__name__}{detail}); nothing in it was run"
        ) from None
    _refuse_expanded_tensors(loaded, path)
    return loaded


def _refuse_expanded_tensors(value: Any, path: Path, where: str = "") -> None:
    """Refuse a tensor whose shape claims more values than its storage holds (a stride-0 expansion: a file of a
    few MB that any copy of it turns into gigabytes); torch.save never writes one for a tensor it saves whole."""
    if isinstance(value, Tensor):
        stored = value.untyped_storage().nbytes() // max(value.element_size(), 1)
        if value.numel() > stored:
            raise ValueError(
                f"checkpoint file '{path}': '{where or 'the tensor'}' claims {tuple(value.shape)} values but its "
                f"storage holds {stored}: a repeated (expanded) tensor is not a saved weight; the file was refused"
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_expanded_tensors(item, path, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_expanded_tensors(item, path, f"{where}[{index}]")


def load_objects(
    to_load: Mapping[str, Any],
    checkpoint: str | Path | Mapping[str, Any],
    *,
    epoch_length: int | None = None,
    **kwargs: Any,
) -> None:
    """``Checkpoint.load_objects`` that loads every object or none: the file is verified
    (:func:`load_checkpoint_file`), then every object's state is checked before any object is loaded.

    Ignite's ``Checkpoint.load_objects`` loads the objects one by one, so a bad entry found late leaves the
    earlier objects overwritten (a model restored, its optimizer not); and given a path, it loads the file with
    ``torch.load``, which does not verify the checksums of the records (a flipped byte loads as a wrong weight).

    Checked before loading: every key of ``to_load`` is in the checkpoint; models: the same keys, shapes and
    kinds of dtype, finite weights; optimizers: the same parameter groups and buffer shapes, finite values;
    engines: integer counters; objects with a ``validate_state_dict`` method (:class:`SwAVQueueHandler`): that
    method; any other object: its ``load_state_dict`` on a copy.

    Resuming on another number of processes (or with another batch size), the new data loader has another epoch
    length; pass it as ``epoch_length`` (``len(loader)``). When the trainer in ``to_load`` was saved with another
    one, it resumes at the same point of the run: the checkpoint must be from the end of an epoch, the
    iteration becomes ``epoch * epoch_length``, and every Ignite parameter scheduler in ``to_load``
    (``ParamScheduler``, ``LRScheduler``, ``ConcatScheduler``, ...), built for the new epoch length and
    attached to the trainer but not yet run, is stepped to the same fraction of its events instead of
    loading its saved counts: per iteration if attached to ``ITERATION_*`` events, per epoch otherwise.
    The queue of a :class:`~ignite_swav.SwAVQueueHandler` in ``to_load`` is resharded by its own
    ``load_state_dict``.

    Args:
        to_load: the objects, as given to ``Checkpoint``.
        checkpoint: a checkpoint file path, or its loaded contents.
        epoch_length: the epoch length of the run that resumes (``len(loader)``).
        kwargs: passed to ``Checkpoint.load_objects`` (such as ``strict``).

    Raises:
        ValueError: a key is missing or an entry is bad (the message names the key); nothing was loaded. With
            ``epoch_length``: a checkpoint from the middle of an epoch of another length, or a scheduler that
            already ran.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from ignite_swav import load_objects
        >>> model = torch.nn.Linear(2, 2)
        >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, path)
        >>> load_objects({"model": model}, path)
        >>> torch.save({"model": {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}}, path)
        >>> load_objects({"model": model}, path)
        Traceback (most recent call last):
        ...
        ValueError: checkpoint entry 'model': 'weight' holds NaN or infinite values (a diverged run)
    """
    if not isinstance(to_load, Mapping):
        raise TypeError(f"to_load must be a mapping of names to objects, got {type(to_load).__name__}")
    state = load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint must be a mapping of names to states, got {type(state).__name__}")
    if len(to_load) == 1 and next(iter(to_load)) not in state:
        state = {next(iter(to_load)): state}  # as Ignite: a file of one object holds its state directly
    check_entries(to_load, state)
    rescaled = _epoch_length_change(to_load, state, epoch_length)
    if rescaled is None:
        Checkpoint.load_objects(to_load=to_load, checkpoint=dict(state), **kwargs)
        return
    trainer_key, old_length = rescaled
    schedulers = {k: v for k, v in to_load.items() if isinstance(v, BaseParamScheduler)}
    loaded = {k: v for k, v in to_load.items() if k not in schedulers}
    Checkpoint.load_objects(to_load=loaded, checkpoint={k: state[k] for k in loaded}, **kwargs)
    trainer = to_load[trainer_key]
    assert epoch_length is not None
    trainer.state.iteration = trainer.state.epoch * epoch_length
    trainer.state.epoch_length = epoch_length
    for key, scheduler in schedulers.items():
        saved = _steps_taken(state[key])
        per_iteration = any(
            trainer.has_event_handler(scheduler, event)
            for event in (Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)
        ) or not any(
            trainer.has_event_handler(scheduler, event) for event in (Events.EPOCH_STARTED, Events.EPOCH_COMPLETED)
        )
        target = round(int(saved) * epoch_length / old_length) if per_iteration else int(saved)
        for _ in range(target):  # the scheduler's own steps: right for warm-ups, cycles and concatenations alike
            cast(Any, scheduler)(None)  # an Ignite handler: called as the engine calls it


def check_entries(to_load: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The checks of :func:`load_objects` before it loads anything: every key of ``to_load`` has an entry in
    ``state`` that its object can load. Changes nothing.

    Raises:
        ValueError: a key is missing or an entry is bad (the message names the key).
    """
    missing = [key for key in to_load if key not in state]
    if missing:
        raise ValueError(f"the checkpoint has no entry {missing} (it holds {sorted(state)[:10]})")
    for key, obj in to_load.items():
        entry = state[key]
        if isinstance(obj, nn.Module):
            check_module_state(key, obj, entry)
        elif isinstance(obj, Optimizer):
            check_optimizer_state(key, obj, entry)
        elif isinstance(obj, Engine):
            check_engine_state(key, entry)
        elif hasattr(obj, "validate_state_dict"):
            try:
                obj.validate_state_dict(entry)
            except (ValueError, TypeError) as error:
                raise ValueError(f"checkpoint entry '{key}': {error}") from None
        elif hasattr(obj, "load_state_dict"):
            try:
                copy.deepcopy(obj).load_state_dict(entry)
            except Exception as error:  # whatever the object raises, it means this entry cannot be used
                detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                raise ValueError(f"checkpoint entry '{key}' cannot be loaded ({detail})") from None


def _steps_taken(scheduler_state: Any) -> int:
    """The events a saved Ignite scheduler has run: its ``event_index``, or for a ``ConcatScheduler`` (which
    counts nothing itself) the sum of its schedulers'."""
    if not isinstance(scheduler_state, Mapping):
        return 0
    if isinstance(scheduler_state.get("schedulers"), list):
        return sum(_steps_taken(inner) for inner in scheduler_state["schedulers"])
    return int(scheduler_state.get("event_index", 0))


def _epoch_length_change(
    to_load: Mapping[str, Any], state: Mapping[str, Any], epoch_length: int | None
) -> tuple[str, int] | None:
    """``(key of the trainer, its saved epoch length)`` when the run resumes on another epoch length, else None;
    raises when that cannot be done exactly."""
    if epoch_length is None:
        return None
    epoch_length = check_int("epoch_length", epoch_length, 1)
    engines = [key for key, obj in to_load.items() if isinstance(obj, Engine)]
    if len(engines) != 1:
        raise ValueError(f"epoch_length needs exactly one Engine (the trainer) in to_load, got {engines or 'none'}")
    saved = state[engines[0]]
    old_length, iteration = saved.get("epoch_length"), saved.get("iteration", 0)
    if old_length is None or old_length == epoch_length:
        return None
    if iteration % old_length != 0:
        raise ValueError(
            f"the checkpoint is from iteration {iteration}, in the middle of an epoch of {old_length} iterations: "
            f"a run resumes on another epoch length ({epoch_length}) only from the end of an epoch"
        )
    for key, obj in to_load.items():
        if isinstance(obj, BaseParamScheduler) and getattr(obj, "event_index", 0) != 0:
            raise ValueError(f"'{key}' has already run {obj.event_index} steps: give schedulers as built, not yet run")
    return engines[0], old_length


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` comes from a full disk (torch's writer reports it as an 'unexpected pos')."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, RuntimeError) and "unexpected pos" in str(error)


class DurableDiskSaver(BaseSaveHandler):
    """A save handler for Ignite's ``Checkpoint`` that never leaves its directory without a complete checkpoint.

    ``Checkpoint`` removes its oldest file before writing the new one; with its default ``n_saved=1``, a process
    killed between the two (a preempted job, an out-of-memory kill) leaves no checkpoint at all. Here a removal
    waits until the next file is complete and on disk: the file is written to a temporary name, flushed to the
    disk (``fsync``), renamed over its final name (atomic), the directory flushed, and only then are the files
    ``Checkpoint`` asked to remove deleted. Killed at any moment, the directory holds the previous checkpoint or
    the new one, whole (``tests/reliability/test_durable_saves.py``: 200 kills at random moments). Files are
    readable by the group and others (0644, as Ignite's ``DiskSaver`` writes them).

    Arguments as Ignite's ``DiskSaver`` (always atomic): the files are written on ``save_on_rank`` only, so the
    ``Checkpoint`` may be attached on every rank or on that one.

    Args:
        dirname: directory of the checkpoints.
        create_dir: create ``dirname`` when it does not exist.
        require_empty: refuse a directory that holds ``.pt`` files already.
        save_on_rank: the rank that writes.
        temporary_prefix: start of the temporary files' names (so that a cleanup can recognise its own).
        kwargs: passed to ``torch.save``.

    Example:
        >>> import tempfile, torch
        >>> from ignite.engine import Engine, Events
        >>> from ignite.handlers import Checkpoint
        >>> from ignite_swav import DurableDiskSaver
        >>> dirname = tempfile.mkdtemp()
        >>> engine = Engine(lambda engine, batch: None)
        >>> checkpoint = Checkpoint({"model": torch.nn.Linear(2, 2)}, DurableDiskSaver(dirname))
        >>> _ = engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        >>> _ = engine.run([0, 1], max_epochs=3)
        >>> sorted(p.name for p in Path(dirname).iterdir())
        ['model_6.pt']
    """

    def __init__(
        self,
        dirname: str | Path,
        create_dir: bool = True,
        require_empty: bool = True,
        save_on_rank: int = 0,
        temporary_prefix: str = ".tmp.",
        **kwargs: Any,
    ) -> None:
        if not isinstance(dirname, (str, Path)):
            raise TypeError(f"dirname must be a str or a pathlib.Path, got {type(dirname).__name__}")
        self.dirname = Path(dirname).expanduser()
        self.save_on_rank = check_int("save_on_rank", save_on_rank, 0)
        if not isinstance(temporary_prefix, str) or not temporary_prefix or "/" in temporary_prefix:
            raise ValueError(f"temporary_prefix must be a non-empty file name prefix, got {temporary_prefix!r}")
        self.temporary_prefix = temporary_prefix
        self.kwargs = kwargs
        self._removals: list[str] = []  # asked for by Checkpoint, carried out once the next file is on disk
        if idist.get_rank() == self.save_on_rank:
            if self.dirname.exists() and not self.dirname.is_dir():
                raise ValueError(f"dirname='{self.dirname}' is a file, not a directory")
            if create_dir:
                self.dirname.mkdir(parents=True, exist_ok=True)
            if not self.dirname.is_dir():
                raise ValueError(f"dirname='{self.dirname}' does not exist (pass create_dir=True to create it)")
            present = sorted(p.name for p in self.dirname.glob("*.pt"))
            if require_empty and present:
                raise ValueError(
                    f"dirname='{self.dirname}' holds checkpoints already ({', '.join(present[:3])}): pass "
                    "require_empty=False to write beside them"
                )

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == self.save_on_rank:
            write_durably(
                self.dirname / filename, lambda path: torch.save(checkpoint, path, **self.kwargs), self.temporary_prefix
            )
            for name in self._removals:
                if name != filename:
                    (self.dirname / name).unlink(missing_ok=True)
        self._removals.clear()

    def remove(self, filename: str) -> None:
        self._removals.append(filename)


def write_durably(path: Path, write: Any, temporary_prefix: str = ".tmp.") -> None:
    """``write(temporary_path)`` in ``path``'s directory, flushed to the disk, then renamed over ``path`` and the
    directory flushed: a reader sees the old file or the new one, never a part, also after a crash. On failure the
    temporary file is removed and the old file stays."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{temporary_prefix}{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
