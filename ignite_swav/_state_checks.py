"""The checks of a checkpoint entry against the object that will load it: a model's, an optimizer's, an engine's
state, each refused in one line naming the entry and what does not fit, before anything is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
from ignite.engine import Engine
from torch import Tensor, nn
from torch.optim import Optimizer

from ignite_swav.modules import unwrap_model


def check_module_state(key: str, module: nn.Module, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint entry '{key}' must be a model state dict, got {type(state).__name__}")
    expected = unwrap_model(module).state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint entry '{key}' holds another model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in expected.items():
        value = state[name]
        if not isinstance(value, Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"checkpoint entry '{key}': '{name}' is {shape}, the model has {tuple(tensor.shape)}")
        if value.is_floating_point() != tensor.is_floating_point():
            raise ValueError(f"checkpoint entry '{key}': '{name}' has dtype {value.dtype}, the model {tensor.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"checkpoint entry '{key}': '{name}' holds NaN or infinite values (a diverged run)")


def check_optimizer_state(key: str, optimizer: Optimizer, state: Any) -> None:
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise ValueError(f"checkpoint entry '{key}' must be an optimizer state dict with 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(f"checkpoint entry '{key}' has another number of parameter groups than the optimizer")
    shapes: dict[Any, tuple[int, ...]] = {}
    for group, saved in zip(groups, saved_groups):
        if not isinstance(saved, Mapping) or len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"checkpoint entry '{key}' has parameter groups of other sizes than the optimizer's")
        # Settings only one side has come and go with torch releases; settings missing on both sides mean another
        # optimizer (Adam's betas saved, SGD's momentum expected).
        unknown = sorted(set(saved) - set(group))
        missing = sorted(set(group) - set(saved) - {"initial_lr"})  # initial_lr: added by torch's lr schedulers
        if unknown and missing:
            raise ValueError(
                f"checkpoint entry '{key}' is the state of another optimizer than {type(optimizer).__name__}: it "
                f"has the settings {unknown}, which {type(optimizer).__name__} has not, and lacks {missing}"
            )
        for name, value in saved.items():
            if name in group:
                check_setting(key, name, value, group[name])
        shapes.update({index: tuple(p.shape) for index, p in zip(saved["params"], group["params"])})
    if not isinstance(state["state"], Mapping):
        raise ValueError(f"checkpoint entry '{key}' has a 'state' that is not a mapping")
    for index, buffers in state["state"].items():
        if not isinstance(buffers, Mapping):
            raise ValueError(f"checkpoint entry '{key}': the state of parameter {index} is not a mapping")
        for name, value in buffers.items():
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != shapes.get(index):
                raise ValueError(
                    f"checkpoint entry '{key}': '{name}' of parameter {index} is {tuple(value.shape)}, the parameter "
                    f"{shapes.get(index)}"
                )
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"checkpoint entry '{key}': '{name}' of parameter {index} holds NaN or infinities")


# settings that no optimizer takes below 0: a negative one would train away from the minimum without a word
_NON_NEGATIVE = ("lr", "initial_lr", "weight_decay", "momentum", "dampening", "eps")


def check_setting(key: str, name: str, value: Any, current: Any) -> None:
    """A saved optimizer setting has the kind of the optimizer's own: a number for a number, a bool for a bool."""
    if name == "params":
        return
    number = (int, float)
    if isinstance(current, bool) or current is None:
        ok = current is None or isinstance(value, bool)
    elif isinstance(current, number):
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(current, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and len(value) == len(current)
        ok = ok and all(isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    else:
        ok = True
    if not ok:
        raise ValueError(
            f"checkpoint entry '{key}': the setting '{name}' is {value!r}, where the optimizer has {current!r}"
        )
    if name in _NON_NEGATIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"checkpoint entry '{key}': the setting '{name}' is {value!r}, it must be >= 0")


def check_engine_state(key: str, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint entry '{key}' must be an engine state dict, got {type(state).__name__}")
    for name in ("epoch_length", "max_epochs", "iteration", "epoch"):
        value = state.get(name)
        if name in state and (isinstance(value, bool) or not isinstance(value, Integral) or value < 0):
            if name == "epoch_length" and value is None:
                continue
            raise ValueError(f"checkpoint entry '{key}': '{name}' must be an integer >= 0, got {value!r}")
    Engine(lambda engine, batch: None).load_state_dict(state)  # Ignite's own checks of required keys
