"""Resuming a run of ``train_swav.py``: the ``--resume-from`` file checked against the run before any process
starts, ``--resume-from auto``, and the loading into the run (on any number of processes)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from models import attach_lr_schedule, build_loss_and_queue_handler, build_model, build_optimizer
from results import RunHistory
from run_dir import CHECKPOINT_PREFIX
from swav_config import ExampleError

from ignite_swav import OnlineLinearProbe, SwAVHealthMonitor, SwAVLoss, load_checkpoint_file, load_objects

CHECKPOINT_KEYS = ("model", "optimizer", "trainer", "queue_handler", "history")
LABELLED_EMBEDDED = ("mnist5k", "digits", "cifar10")  # 10 classes each
logger = logging.getLogger("train_swav")


def newest_valid_checkpoint(output_dir: Path) -> Path | None:
    """``--resume-from auto``: the newest checkpoint of ``output_dir`` that loads (a requeued SLURM job resumes by
    itself), or ``None`` when there is none (the run starts afresh)."""
    saved = (
        sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if output_dir.is_dir()
        else []
    )
    for path in reversed(saved):
        try:
            load_checkpoint_file(path)
        except ValueError as error:
            logger.warning("--resume-from auto: skipping %s (%s)", path.name, error)
            continue
        return path
    return None


def load_resume_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint of ``--resume-from``, read safely and checked against this run, entry by entry, before
    any process starts or anything is written."""
    path = args.resume_from
    if not path.is_file():
        kind = "is not a file" if path.exists() or path.is_symlink() else "does not exist"
        raise ExampleError(f"--resume-from '{path}' {kind}")
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as error:
        raise ExampleError(str(error)) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ExampleError(f"--resume-from '{path}' is not a checkpoint of this script: it lacks {missing}")
    history = checkpoint["history"]
    saved = history.get("config") if isinstance(history, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    for key in ("dataset", "seed"):  # another seed is another held-out split: its images may have been trained on
        if key in saved and saved[key] != getattr(args, key):
            flag = "--" + key
            raise ExampleError(
                f"--resume-from '{path}' was trained with {flag} {saved[key]}, this run has {flag} "
                f"{getattr(args, key)}: pass {flag} {saved[key]} to continue it (another {key} would change the "
                "held-out images)"
            )
    # every entry is checked by loading it into throw-away objects built like the run's: all or nothing
    model = build_model(args)
    _, handler = build_loss_and_queue_handler(args)
    probes: dict[str, Any] = {
        "model": model,
        "optimizer": build_optimizer(model, args),
        "trainer": Engine(lambda e, b: None),
        "queue_handler": handler,
        "history": RunHistory(args),
    }
    if "health" in checkpoint:  # written since the health monitor exists
        probes["health"] = SwAVHealthMonitor(SwAVLoss())
    if "probe" in checkpoint and args.dataset in LABELLED_EMBEDDED:  # the classes of other data sets: from the data
        probes["probe"] = OnlineLinearProbe(model.backbone, num_classes=10)
    try:
        load_objects(probes, {k: checkpoint[k] for k in probes})
    except ValueError as error:
        if str(error).startswith("checkpoint entry 'model'") and "NaN" not in str(error):
            raise ExampleError(
                f"--resume-from '{path}' holds another model than --arch {args.arch} with --feat-dim "
                f"{args.feat_dim}, --num-prototypes {args.num_prototypes}, --hidden-dim {args.hidden_dim}: {error}"
            ) from None
        raise ExampleError(f"--resume-from '{path}': {error}") from None
    epoch = probes["trainer"].state.epoch
    if epoch > args.epochs:
        raise ExampleError(
            f"--resume-from '{path}' is at epoch {epoch}, after --epochs {args.epochs}: pass --epochs {epoch} or more"
        )
    return checkpoint


def resume_run(
    trainer: Engine, to_save: dict[str, Any], checkpoint: dict[str, Any], epoch_length: int, args: argparse.Namespace
) -> bool:
    """Load the checkpoint into the run; returns whether training is already complete (only the final figures
    are left, as after a run killed during them). On another number of processes or batch size the epoch length
    changes: the trainer, the queue and the learning rate schedule resume at the same point of the run."""
    # another --epochs: the schedule as if the run had been planned for that length (not the saved one's)
    planned = checkpoint["history"].get("config", {}).get("epochs")
    replanned = planned is not None and planned != args.epochs
    checkpoint = with_one_lr_scheduler(checkpoint, args)
    schedulers = [key for key in to_save if key.startswith("lr_")]
    fresh = [key for key in schedulers if key not in checkpoint or replanned]
    try:
        loaded = {k: v for k, v in to_save.items() if k in checkpoint and k not in fresh}
        load_objects(loaded, checkpoint, epoch_length=epoch_length)
    except ValueError as error:
        raise ExampleError(f"--resume-from '{args.resume_from}': {error}") from None
    state = trainer.state
    for key in fresh:  # stepped to the run's iteration, as a scheduler of this plan would be there
        for _ in range(state.iteration):
            to_save[key](None)
    if replanned:
        to_save["history"].config["epochs"] = args.epochs
        logger.info(f"the learning rate schedule follows --epochs {args.epochs} (the run was planned for {planned})")
    logger.info(f"resumed from '{args.resume_from}' at epoch {state.epoch} (iteration {state.iteration})")
    return state.epoch >= args.epochs


def with_one_lr_scheduler(checkpoint: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``checkpoint`` with the learning rate schedule of this version: ignite-swav 0.2 saved two schedulers
    ('lr_warmup', 'lr_cosine'), now one ('lr_scheduler'), in the checkpoint and in the queue guard's copy of the
    state: their state replaced by the one's, stepped as many iterations on the saved epoch length."""
    epoch_length = checkpoint["trainer"].get("epoch_length") or 1

    def upgraded(states: dict[str, Any], iteration: int) -> dict[str, Any]:
        if "lr_cosine" not in states:
            return states
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)  # only its counts are kept
        scheduler = attach_lr_schedule(Engine(lambda e, b: None), optimizer, args, epoch_length)["lr_scheduler"]
        for _ in range(iteration):
            scheduler(None)
        kept = {k: v for k, v in states.items() if k not in ("lr_warmup", "lr_cosine")}
        return {**kept, "lr_scheduler": scheduler.state_dict()}

    checkpoint = upgraded(checkpoint, checkpoint["trainer"].get("iteration", 0))
    guard = checkpoint.get("queue_guard")
    snapshot = guard.get("snapshot") if isinstance(guard, dict) else None
    if isinstance(snapshot, dict) and isinstance(snapshot.get("objects"), dict):
        objects = upgraded(snapshot["objects"], snapshot.get("iteration", 0))
        checkpoint["queue_guard"] = {**guard, "snapshot": {**snapshot, "objects": objects}}
    return checkpoint
