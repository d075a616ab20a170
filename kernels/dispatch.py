"""The dispatch point that picks, per device, the kernel a quantized layer runs.

``quantized_linear`` and ``quantized_conv2d`` are what quantized modules call. On CUDA (with
Triton installed) ``quantized_linear`` runs the fused Triton kernels of
:mod:`diffq.kernels.triton_ops`; everything else runs the pure-torch reference in
:mod:`diffq.kernels.reference`, which computes the same function. Set ``DIFFQ_NO_TRITON=1``
to keep CUDA on the reference too.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
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


def _triton_quantized_linear(*args: Any, **kwargs: Any) -> torch.Tensor:
    """First CUDA call imports Triton; if it cannot, CUDA falls back to the reference for good."""
    try:
        from diffq.kernels.triton_ops import quantized_linear_triton
    except ImportError as exc:
        warnings.warn(f"Triton kernels unavailable ({exc}); CUDA runs the reference kernels.", stacklevel=2)
        _KERNELS["quantized_linear"].pop("cuda", None)
        return reference.quantized_linear(*args, **kwargs)
    register_kernel("quantized_linear", "cuda", quantized_linear_triton)
    return quantized_linear_triton(*args, **kwargs)


def _register_cuda_kernels() -> None:
    """Serve CUDA tensors with Triton when it is installed and a GPU exists (Triton loads lazily)."""
    if os.environ.get("DIFFQ_NO_TRITON") == "1" or importlib.util.find_spec("triton") is None:
        return
    if torch.cuda.is_available():
        register_kernel("quantized_linear", "cuda", _triton_quantized_linear)


_register_cuda_kernels()
