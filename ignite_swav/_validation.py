"""Small argument checks shared by the package: each raises an error that names the argument and what is valid."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import torch


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, or raise if it is not an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_positive_float(name: str, value: object, minimum: float = 0.0) -> float:
    """Return ``value`` as a float, or raise if it is not a finite number ``> 0`` (and ``>= minimum``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 < value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be a positive finite number >= {minimum:g}, got {value:g}")
    return value


def check_nonnegative_float(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise if it is not a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not 0.0 <= number < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    return number


def check_crops_for_assign(value: object) -> tuple[int, ...]:
    """Return ``crops_for_assign`` as a tuple of distinct non-negative crop indices, or raise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"crops_for_assign must be a sequence of crop indices such as (0, 1), got {value!r}")
    if len(value) == 0:
        raise ValueError("crops_for_assign must name at least one crop, got an empty sequence")
    crops = tuple(check_int(f"crops_for_assign[{i}]", c, 0) for i, c in enumerate(value))
    if len(set(crops)) != len(crops):
        raise ValueError(f"crops_for_assign must not repeat a crop, got {crops}")
    return crops


def resolve_autocast_dtype(amp_mode: str | None, amp_dtype: torch.dtype | None, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``amp_mode`` / ``amp_dtype`` on ``device_type`` (``None``: no autocast), or raise:
    bfloat16 on the CPU and float16 on CUDA by default."""
    if amp_mode is None:
        if amp_dtype is not None:
            raise ValueError(f"amp_dtype={amp_dtype} is only used with amp_mode='amp'")
        return None
    if amp_mode != "amp":
        raise ValueError(f"amp_mode must be None or 'amp' (torch.autocast), got {amp_mode!r}")
    supported = {"cpu": (torch.bfloat16, torch.float16), "cuda": (torch.float16, torch.bfloat16)}
    if device_type not in supported:
        raise ValueError(f"amp_mode='amp' is not supported on device type '{device_type}'; use 'cpu' or 'cuda'")
    dtype = amp_dtype or supported[device_type][0]
    if dtype not in supported[device_type]:
        raise ValueError(
            f"amp_dtype={dtype} cannot be used by autocast on '{device_type}'; valid: {supported[device_type]}"
        )
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("amp_dtype=torch.bfloat16 is not supported by this GPU; use torch.float16 with scaler=True")
    return dtype


def device_type_of(device: str | torch.device | None) -> str:
    """The type of ``device`` (``"cpu"`` for ``None``), or raise when it cannot hold a run here (meta, a GPU this
    machine does not have)."""
    if device is None:
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be None, a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from None
    if parsed.type == "meta":
        raise ValueError("device='meta' holds no values: train on 'cpu' or 'cuda'")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r}, but no CUDA GPU is available here: use 'cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device={str(device)!r}, but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    return parsed.type
