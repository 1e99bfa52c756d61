"""Small argument checks shared by the package: each raises an error that names the argument and what is valid."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real


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
