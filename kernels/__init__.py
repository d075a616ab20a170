"""Kernels for quantized layers, and the one dispatch point that picks them per device.

``quantized_linear`` and ``quantized_conv2d`` are what quantized modules call. On CUDA they
will run fused Triton kernels once those are registered; everywhere else they run the
pure-torch reference in :mod:`diffq.kernels.reference`, which computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffq.kernels import reference
from diffq.kernels.packing import pack, packed_cols, unpack

__all__ = ["quantized_linear", "quantized_conv2d", "register_kernel", "backend_for", "pack", "unpack", "packed_cols"]

# op name -> device type -> implementation; the reference serves every device not listed.
_KERNELS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "quantized_linear": {},
    "quantized_conv2d": {},
}
_REFERENCE: dict[str, Callable[..., torch.Tensor]] = {
    "quantized_linear": reference.quantized_linear,
    "quantized_conv2d": reference.quantized_conv2d,
}


def register_kernel(op: str, device_type: str, fn: Callable[..., torch.Tensor]) -> None:
    """Make ``fn`` the implementation of ``op`` for tensors on ``device_type`` (e.g. ``"cuda"``)."""
    if op not in _KERNELS:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_KERNELS)}")
    _KERNELS[op][device_type] = fn


def backend_for(op: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The implementation of ``op`` that tensors on ``device`` run."""
    return _KERNELS[op].get(device.type, _REFERENCE[op])


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Linear layer with packed integer weights; see :func:`reference.quantized_linear`."""
    return backend_for("quantized_linear", x.device)(x, qweight, *args, **kwargs)


def quantized_conv2d(x: torch.Tensor, qweight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Conv2d with packed integer weights; see :func:`reference.quantized_conv2d`."""
    return backend_for("quantized_conv2d", x.device)(x, qweight, *args, **kwargs)
