"""Checks of user arguments at the public entry points, each failing with a :class:`QuantizationInputError`
that names the argument, what it got and what it takes."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from diffq.errors import QuantizationInputError


def whole_number(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int, if it is a whole number (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise QuantizationInputError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")
    if value < minimum:
        raise QuantizationInputError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def finite_number(value: Any, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, if it is a finite real number within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise QuantizationInputError(f"{name} must be a finite number, got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low:g} and {high:g}" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise QuantizationInputError(f"{name} must be {span}, got {value:g}.")
    return float(value)


def path_like(value: Any, name: str) -> str:
    """``value`` as a non-empty path string."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise QuantizationInputError(f"{name} must be a non-empty path or name, got {value!r}.")
    return os.fspath(value)


def mapping(value: Any, name: str) -> dict[str, Any]:
    """``value`` (``None`` or a mapping of keyword arguments) as a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise QuantizationInputError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}.")
    return dict(value)


def of_type(value: Any, name: str, kind: type | tuple[type, ...], hint: str, *, optional: bool = False) -> Any:
    """``value`` if it is a ``kind`` (or ``None`` when ``optional``); ``hint`` says where one comes from."""
    if (optional and value is None) or isinstance(value, kind):
        return value
    raise QuantizationInputError(f"{name} must be {hint}, got {type(value).__name__}.")


__all__ = ["finite_number", "mapping", "of_type", "path_like", "whole_number"]
