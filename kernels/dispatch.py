"""The dispatch point: the quantized ops, registered with ``torch.library`` as ``diffq::``.

``torch.ops.diffq.quantized_linear`` and ``torch.ops.diffq.quantized_conv2d`` are single graph
nodes to ``torch.compile``, with one implementation per device, chosen by PyTorch's dispatcher:

* CPU: the integer kernels of :mod:`diffq.kernels.cpu` (``torch._int_mm``);
* CUDA (with Triton installed): the fused Triton kernels of :mod:`diffq.kernels.triton_ops` for
  linear layers and convolutions (1x1 ones as linear layers over their pixels, others as an
  implicit GEMM, with dynamic activation scales on the fake-quantized input in 16 bits; grouped
  convolutions run the reference);
* every other device: the pure-torch reference in :mod:`diffq.kernels.reference`, which
  *defines* the function the others compute;
* fake tensors (tracing, ``torch.compile``): output shapes only.

Each kernel runs the reference for calls it cannot serve and says why in its
``unsupported_reason`` (:func:`unsupported_reason` here asks the right one). Set
``DIFFQ_KERNELS=reference`` to run the reference everywhere (for debugging), or
``DIFFQ_NO_TRITON=1`` to keep CUDA alone on the reference.

:func:`quantized_linear` and :func:`quantized_conv2d` are the Python front doors quantized
modules call: they take the reference's keyword arguments and call the op.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch

from diffq.kernels import cpu, reference
from diffq.kernels.packing import pack, packed_cols, unpack

__all__ = [
    "kernel_codes",
    "pack",
    "packed_cols",
    "quantized_conv2d",
    "quantized_linear",
    "reference_forced",
    "unpack",
    "unsupported_reason",
]

kernel_codes = cpu.kernel_codes


def reference_forced() -> bool:
    """Whether ``DIFFQ_KERNELS=reference`` sends every call to the reference."""
    return os.environ.get("DIFFQ_KERNELS", "").strip().lower() == "reference"


def _triton_wanted() -> bool:
    return os.environ.get("DIFFQ_NO_TRITON") != "1" and importlib.util.find_spec("triton") is not None


def _padding_of(padding: Sequence[int], padding_str: str | None) -> tuple[int, int] | str:
    return padding_str if padding_str else (int(padding[0]), int(padding[1]))


@torch.library.custom_op("diffq::quantized_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_bits: int,
    w_code_offset: int,
    in_features: int,
    bias: torch.Tensor | None,
    act_bits: int | None,
    act_scale: torch.Tensor | None,
    act_group_size: int | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    codes: torch.Tensor | None,
) -> torch.Tensor:
    """The reference: what every device without a kernel of its own runs."""
    return reference.quantized_linear(
        x, qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, in_features=in_features,
        bias=bias, act_bits=act_bits, act_scale=act_scale, act_group_size=act_group_size, smooth=smooth,
        lowrank_down=lowrank_down, lowrank_up=lowrank_up,
    )


@_linear_op.register_fake
def _linear_fake(x, qweight, *args) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@_linear_op.register_kernel("cpu")
def _linear_cpu(
    x, qweight, w_scale, w_zero, w_bits, w_code_offset, in_features, bias, act_bits, act_scale,
    act_group_size, smooth, lowrank_down, lowrank_up, codes,
) -> torch.Tensor:
    kernel = reference.quantized_linear if reference_forced() else cpu.quantized_linear
    extra = {} if kernel is reference.quantized_linear else {"codes": codes}
    return kernel(
        x, qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, in_features=in_features,
        bias=bias, act_bits=act_bits, act_scale=act_scale, act_group_size=act_group_size, smooth=smooth,
        lowrank_down=lowrank_down, lowrank_up=lowrank_up, **extra,
    )


@_linear_op.register_kernel("cuda")
def _linear_cuda(
    x, qweight, w_scale, w_zero, w_bits, w_code_offset, in_features, bias, act_bits, act_scale,
    act_group_size, smooth, lowrank_down, lowrank_up, codes,
) -> torch.Tensor:
    kwargs = dict(w_bits=w_bits, w_code_offset=w_code_offset, in_features=in_features, bias=bias,
                  act_bits=act_bits, act_scale=act_scale, act_group_size=act_group_size, smooth=smooth,
                  lowrank_down=lowrank_down, lowrank_up=lowrank_up)
    triton_linear = _triton_linear() if _triton_wanted() and not reference_forced() else None
    kernel = triton_linear or reference.quantized_linear
    return kernel(x, qweight, w_scale, w_zero, **kwargs)


_TRITON: dict[str, object] = {}


def _triton_launcher(name: str):
    """``triton_ops.<name>``, imported on the first CUDA call; ``None`` (with one warning) if it cannot be."""
    if "module" not in _TRITON:
        try:
            from diffq.kernels import triton_ops
        except ImportError as exc:
            warnings.warn(f"Triton kernels unavailable ({exc}); CUDA runs the reference kernels.", stacklevel=3)
            triton_ops = None
        _TRITON["module"] = triton_ops
    return None if _TRITON["module"] is None else getattr(_TRITON["module"], name)


def _triton_linear():
    """The Triton linear launcher, or ``None`` where Triton does not import."""
    return _triton_launcher("quantized_linear_triton")


@torch.library.custom_op("diffq::quantized_conv2d", mutates_args=())
def _conv2d_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_bits: int,
    w_code_offset: int,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    padding_str: str | None,
    dilation: list[int],
    groups: int,
    bias: torch.Tensor | None,
    act_bits: int | None,
    act_scale: torch.Tensor | None,
    act_segments: list[int],
    act_group_size: int | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    codes: torch.Tensor | None,
) -> torch.Tensor:
    """The reference: what every device without a kernel of its own runs."""
    return reference.quantized_conv2d(
        x, qweight, w_scale, w_zero, **_conv_kwargs(
            w_bits, w_code_offset, weight_shape, stride, padding, padding_str, dilation, groups, bias, act_bits,
            act_scale, act_segments, act_group_size, smooth, lowrank_down, lowrank_up,
        )
    )


def _conv_kwargs(
    w_bits, w_code_offset, weight_shape, stride, padding, padding_str, dilation, groups, bias, act_bits, act_scale,
    act_segments, act_group_size, smooth, lowrank_down, lowrank_up,
) -> dict:
    return dict(
        w_bits=w_bits, w_code_offset=w_code_offset, weight_shape=tuple(weight_shape), stride=tuple(stride),
        padding=_padding_of(padding, padding_str), dilation=tuple(dilation), groups=groups, bias=bias,
        act_bits=act_bits, act_scale=act_scale, act_segments=tuple(act_segments), act_group_size=act_group_size,
        smooth=smooth, lowrank_down=lowrank_down, lowrank_up=lowrank_up,
    )


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@_conv2d_op.register_fake
def _conv2d_fake(x, qweight, w_scale, w_zero, w_bits, w_code_offset, weight_shape, stride, padding, padding_str,
                 dilation, *args) -> torch.Tensor:
    if padding_str == "same":
        height, width = x.shape[2], x.shape[3]
    else:
        pad = (0, 0) if padding_str == "valid" else padding
        height, width = (
            _conv_output_size(x.shape[2 + i], weight_shape[2 + i], stride[i], pad[i], dilation[i]) for i in (0, 1)
        )
    return x.new_empty(x.shape[0], weight_shape[0], height, width)


@_conv2d_op.register_kernel("cpu")
def _conv2d_cpu(x, qweight, w_scale, w_zero, *rest) -> torch.Tensor:
    *options, codes = rest
    kwargs = _conv_kwargs(*options)
    if reference_forced():
        return reference.quantized_conv2d(x, qweight, w_scale, w_zero, **kwargs)
    return cpu.quantized_conv2d(x, qweight, w_scale, w_zero, codes=codes, **kwargs)


@_conv2d_op.register_kernel("cuda")
def _conv2d_cuda(x, qweight, w_scale, w_zero, *rest) -> torch.Tensor:
    *options, codes = rest
    kwargs = _conv_kwargs(*options)
    triton_conv = (_triton_launcher("quantized_conv2d_triton")
                   if _triton_wanted() and not reference_forced() else None)
    kernel = triton_conv or reference.quantized_conv2d
    return kernel(x, qweight, w_scale, w_zero, **kwargs)


def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    w_code_offset: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    act_bits: int | None = None,
    act_scale: torch.Tensor | None = None,
    act_group_size: int | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer with packed integer weights (``diffq::quantized_linear``); see
    :func:`reference.quantized_linear`. ``codes``: the weight prepared by :func:`kernel_codes`
    for the CPU kernel (optional; other devices ignore it)."""
    return _linear_op(
        x, qweight, w_scale, w_zero, w_bits, w_code_offset, in_features, bias, act_bits, act_scale,
        act_group_size, smooth, lowrank_down, lowrank_up, codes,
    )


def quantized_conv2d(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    w_code_offset: int,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    groups: int,
    bias: torch.Tensor | None = None,
    act_bits: int | None = None,
    act_scale: torch.Tensor | None = None,
    act_segments: tuple[int, ...] = (),
    act_group_size: int | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv2d with packed integer weights (``diffq::quantized_conv2d``); see
    :func:`reference.quantized_conv2d`."""
    numeric = (0, 0) if isinstance(padding, str) else padding
    return _conv2d_op(
        x, qweight, w_scale, w_zero, w_bits, w_code_offset, list(weight_shape), list(stride), list(numeric),
        padding if isinstance(padding, str) else None, list(dilation), groups, bias, act_bits, act_scale,
        list(act_segments), act_group_size, smooth, lowrank_down, lowrank_up, codes,
    )


def unsupported_reason(op: str, x: torch.Tensor, *args: object, **kwargs: object) -> str | None:
    """Why a call of ``op`` (``"quantized_linear"`` or ``"quantized_conv2d"``) on ``x``'s device runs
    the reference instead of that device's kernel; ``None`` when the kernel runs it."""
    if reference_forced():
        return "DIFFQ_KERNELS=reference"
    if x.device.type == "cpu":
        check = cpu.linear_unsupported_reason if op == "quantized_linear" else cpu.conv2d_unsupported_reason
        return check(x, *args, **kwargs)
    if x.device.type == "cuda" and _triton_wanted():
        from diffq.kernels import triton_ops

        kwargs.pop("codes", None)
        check = triton_ops.unsupported_reason if op == "quantized_linear" else triton_ops.conv2d_unsupported_reason
        return check(x, *args, **kwargs)
    return f"no {op} kernel for {x.device.type} tensors"
