"""The experiment loggers of ``train_swav.py`` (``--logger``): Ignite's own logger classes, each given the same
figures (loss and learning rate every iteration; the health monitor's figures, the k-NN and online probe
top-1, the images per second every epoch; the queue guard's retreats; the final figures) and the resolved
settings as the run's parameters. Where each writes, and how to look at it: docs/after-training.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ignite import distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from ignite.handlers.base_logger import BaseLogger
from results import HEALTH_METRICS

from ignite_swav import SwAVEvents

EPOCH_FIGURES = ("knn_top1", "online_linear_top1", "images_per_s", "queue_used")


def create_logger(name: str, args: argparse.Namespace) -> BaseLogger:
    """The Ignite logger ``name``, writing under ``--output-dir`` where it writes files. The services' own
    settings come from their environment variables (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``, ``WANDB_PROJECT``,
    ``CLEARML_*``, ``NEPTUNE_PROJECT`` and ``NEPTUNE_API_TOKEN``, ...)."""
    from ignite import handlers

    run_name = args.output_dir.resolve().name
    if name == "tensorboard":
        return handlers.TensorboardLogger(log_dir=str(args.output_dir / "tensorboard"))
    if name == "mlflow":  # a local SQLite store in the run's directory unless a tracking server is set
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(args.output_dir / 'mlflow.db').resolve()}"
        return handlers.MLflowLogger(tracking_uri=uri)
    if name == "wandb":
        project = os.environ.get("WANDB_PROJECT", "ignite-swav")
        return handlers.WandBLogger(project=project, name=run_name, dir=str(args.output_dir))
    if name == "clearml":
        return handlers.ClearMLLogger(project_name="ignite-swav", task_name=run_name)
    if name == "neptune":
        return handlers.NeptuneLogger(project=os.environ.get("NEPTUNE_PROJECT"), name=run_name)
    if name == "visdom":
        return handlers.VisdomLogger(env=run_name)
    return handlers.PolyaxonLogger()


def log_settings(name: str, logger: Any, config: dict[str, Any]) -> None:
    """The resolved settings as the run's parameters, in each service's own way."""
    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str) for k, v in config.items()}
    if name == "tensorboard":
        logger.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```")
    elif name == "mlflow":
        logger.log_params(flat)
    elif name == "wandb":
        logger.config.update(flat, allow_val_change=True)
    elif name == "clearml":
        from clearml import Task

        Task.current_task().connect(flat)
    elif name == "neptune":
        logger["parameters"] = flat
    elif name == "visdom":
        logger.vis.text(json.dumps(config, indent=1, default=str), env=logger.vis.env)
    else:
        logger.log_inputs(**flat)


def attach_experiment_loggers(trainer: Engine, objects: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    """On rank 0, the loggers of ``--logger``, attached to ``trainer``, and a progress bar when the output is a
    terminal (a log file gets the epoch lines only); returns the loggers (for :func:`log_final_figures`)."""
    if idist.get_rank() > 0:
        return []
    if sys.stderr.isatty():
        ProgressBar(persist=False, desc="SwAV").attach(trainer, output_transform=lambda loss: {"loss": loss})
    loggers = []
    for name in dict.fromkeys(n for n in args.logger if n != "none"):
        logger = create_logger(name, args)
        log_settings(name, logger, objects["history"].config)
        attach_figures(logger, trainer, objects)
        loggers.append(logger)
    return loggers


def attach_figures(logger: BaseLogger, trainer: Engine, objects: dict[str, Any]) -> None:
    """The figures of the run, through the logger's own ``OutputHandler`` and ``OptimizerParamsHandler``."""
    # every figure at the iteration it belongs to (W&B drops a step lower than one it has logged: an epoch number)
    step = {"global_step_transform": lambda engine, _: engine.state.iteration}
    loss = {"output_transform": lambda loss: {"loss": loss}}
    logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED, tag="train", **loss, **step)
    logger.attach_opt_params_handler(trainer, Events.ITERATION_STARTED, objects["optimizer"], param_name="lr")
    health = {"metric_names": list(HEALTH_METRICS)}
    logger.attach_output_handler(trainer, Events.EPOCH_COMPLETED, tag="health", **health, **step)

    def epoch_figures(_: Any) -> dict[str, float]:  # after the epoch's record: its evaluations
        record = objects["history"].records[-1]
        return {key: float(record[key]) for key in EPOCH_FIGURES if key in record}

    logger.attach_output_handler(trainer, Events.EPOCH_COMPLETED, tag="epoch", output_transform=epoch_figures, **step)
    guard = objects.get("queue_guard")
    if guard is not None:  # an event of ours: given to the handler directly (Ignite's attach knows its own only)
        output_handler = sys.modules[type(logger).__module__].OutputHandler
        retreats = output_handler(
            "queue_guard",
            output_transform=lambda _: {
                "retreats": len(guard.retreats),
                "queue_length": trainer.state.queue_retreat.queue_length,  # 0: no queue from now on
            },
            global_step_transform=lambda engine, _: guard.global_step_transform(engine),
        )
        trainer.add_event_handler(SwAVEvents.QUEUE_RETREATED, retreats, logger, SwAVEvents.QUEUE_RETREATED)


def log_final_figures(loggers: list[Any], results: dict[str, Any], step: int) -> None:
    """The run's final numbers (k-NN, probes, clusters) as ``final/...`` at iteration ``step``, then close each
    logger."""
    figures = {k: v for k, v in results.items() if isinstance(v, float)}  # not the counts (seed, epochs, ...)
    final = Engine(lambda engine, batch: figures)  # an engine of one step: the loggers' handlers need one
    for logger in loggers:
        final_step = {"global_step_transform": lambda *_: step}
        logger.attach_output_handler(
            final, Events.COMPLETED, tag="final", output_transform=lambda out: out, **final_step
        )
    final.run([0])
    for logger in loggers:
        logger.close()
