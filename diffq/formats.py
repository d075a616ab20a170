"""Number formats and quantizer math, in plain torch.

Integer formats
---------------
A tensor is quantized to ``bits``-bit integers with a scale (and, when asymmetric, a zero
point) per *block*: the whole tensor, one output channel (row), or a group of ``group_size``
consecutive elements along the last dimension of a row.

* symmetric: ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, ``s = absmax / (2^(b-1) - 1)``
* asymmetric: ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)``,
  ``z = round(-min / s)``

Stored codes are always unsigned: a symmetric value ``q`` is stored as ``q + 2^(b-1)``
(offset binary), an asymmetric one as ``q`` itself.

Packed storage (two 4-bit codes per byte, ...) is documented in :mod:`diffq.kernels.packing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from diffq.errors import QuantizationInputError
from diffq.kernels import packing
from diffq.kernels.packing import packed_cols, unpack

__all__ = ["IntFormat", "QuantizedTensor", "compute_scales", "quantize", "dequantize", "fake_quantize",
           "largest_group_size", "pack", "unpack", "packed_cols", "quantize_fp8", "dequantize_fp8", "fp8_available"]

Granularity = Literal["tensor", "channel", "group"]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`diffq.kernels.packing.pack`, its refusals (a width it cannot pack, codes too wide) as
    :class:`QuantizationInputError`."""
    try:
        return packing.pack(codes, bits)
    except ValueError as err:
        raise QuantizationInputError(str(err)) from None

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class IntFormat:
    """An integer format: bit width, symmetry and the block each scale covers."""

    bits: int
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizationInputError(
                f"{self.bits}-bit integers are not supported; use one of {SUPPORTED_BITS}."
            )
        if self.granularity not in ("tensor", "channel", "group"):
            raise QuantizationInputError(
                f"unknown granularity {self.granularity!r}; use 'tensor', 'channel' or 'group'."
            )
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise QuantizationInputError("granularity='group' needs a positive group_size, e.g. 64.")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_offset(self) -> int:
        """What is added to an integer value to get its stored unsigned code."""
        return 2 ** (self.bits - 1) if self.symmetric else 0


@dataclass
class QuantizedTensor:
    """Integer codes of a 2-D tensor with the scales (and zero points) that restore it.

    ``codes`` is ``uint8`` of shape ``[rows, cols]`` (unpacked); ``scale`` and ``zero`` have
    shape ``[rows or 1, blocks per row]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: IntFormat

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.fmt, dtype=dtype)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise a clear error if ``x`` holds NaN or infinity."""
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "infinity"
        raise QuantizationInputError(
            f"the {what} to quantize contains {bad}; quantization needs finite values. "
            "Check the model weights or the calibration inputs for overflow (e.g. fp16 overflow: "
            "run calibration in float32)."
        )


def block_view(x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """View a 2-D tensor as ``[rows, blocks, block_len]`` for the format's granularity."""
    rows, cols = x.shape
    if fmt.granularity == "tensor":
        return x.reshape(1, 1, rows * cols)
    if fmt.granularity == "channel":
        return x.reshape(rows, 1, cols)
    assert fmt.group_size is not None
    if cols % fmt.group_size != 0:
        raise QuantizationInputError(
            f"group size {fmt.group_size} does not divide the row length {cols}; "
            f"choose a group size that divides {cols} (e.g. {largest_group_size(cols, fmt.group_size)}) "
            "or use per-channel quantization."
        )
    return x.reshape(rows, cols // fmt.group_size, fmt.group_size)


def largest_group_size(cols: int, requested: int, minimum: int = 8) -> int | None:
    """The largest power of two ``<= requested`` that divides ``cols`` (``None`` below ``minimum``)."""
    size = 1 << int(math.floor(math.log2(max(requested, 1))))
    while size >= minimum:
        if cols % size == 0:
            return size
        size //= 2
    return None


def block_range(blocks: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What each block's scale is computed from: ``(absmax, None)`` for a symmetric format, else
    ``(lo, hi)``, the block's range widened to include zero. ``blocks`` is a :func:`block_view`."""
    if fmt.symmetric:
        return blocks.abs().amax(dim=-1), None
    return blocks.amin(dim=-1).clamp_max(0), blocks.amax(dim=-1).clamp_min(0)


def range_scales(
    low: torch.Tensor, high: torch.Tensor | None, fmt: IntFormat, clip_ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) from a :func:`block_range`, shrunk by ``clip_ratio``."""
    tiny = torch.finfo(torch.float32).tiny
    if high is None:
        absmax = low * clip_ratio
        scale = (absmax / fmt.qmax).clamp_min(tiny)
        # All-zero blocks get scale 1 so codes are exactly zero and nothing divides by ~0.
        scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
        return scale, None
    lo, hi = low * clip_ratio, high * clip_ratio
    span = hi - lo
    scale = torch.where(span > 0, span / fmt.qmax, torch.ones_like(span)).clamp_min(tiny)
    zero = torch.round(-lo / scale).clamp(0, fmt.qmax)
    return scale, zero


def compute_scales(
    x: torch.Tensor, fmt: IntFormat, clip_ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (and zero points) of a 2-D tensor; ``clip_ratio`` shrinks the range."""
    if x.dim() != 2:
        raise QuantizationInputError(f"expected a 2-D tensor, got shape {tuple(x.shape)}.")
    check_finite(x)
    return range_scales(*block_range(block_view(x.float(), fmt), fmt), fmt, clip_ratio)


def fake_quantize_blocks(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: IntFormat
) -> torch.Tensor:
    """The float32 values :func:`quantize` then :func:`dequantize` give a :func:`block_view`, without
    making the integer codes (a new tensor; ``blocks`` is not changed)."""
    s = scale.unsqueeze(-1)
    q = torch.round(blocks / s)
    if zero is None:
        return q.clamp_(fmt.qmin, fmt.qmax).mul_(s)
    z = zero.unsqueeze(-1)
    return q.add_(z).clamp_(fmt.qmin, fmt.qmax).sub_(z).mul_(s)


def quantize(
    x: torch.Tensor,
    fmt: IntFormat,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D tensor; scales are min-max unless given."""
    if scale is None:
        scale, zero = compute_scales(x, fmt)
    else:
        check_finite(x)
    blocks = block_view(x.float(), fmt)
    q = torch.round(blocks / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    q = q.clamp(fmt.qmin, fmt.qmax) + fmt.code_offset
    codes = q.to(torch.uint8).reshape(x.shape)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, fmt=fmt)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: IntFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Restore floats from unpacked codes: ``(code - offset - zero) * scale``."""
    blocks = block_view(codes, fmt).to(torch.float32) - fmt.code_offset
    if zero is not None:
        blocks = blocks - zero.to(torch.float32).unsqueeze(-1)
    return (blocks * scale.to(torch.float32).unsqueeze(-1)).reshape(codes.shape).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: IntFormat, clip_ratio: float = 1.0, check: bool = True) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype (used for error measurement, not storage).
    ``check=False`` skips the NaN/infinity check, for searches that checked their input once."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]) if x.dim() != 2 else x
    if check:
        check_finite(flat)
    blocks = block_view(flat.float(), fmt)
    scale, zero = range_scales(*block_range(blocks, fmt), fmt, clip_ratio)
    return fake_quantize_blocks(blocks, scale, zero, fmt).reshape(shape).to(x.dtype)


# --------------------------------------------------------------------------- fp8

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def fp8_available() -> bool:
    """Whether this torch build has the float8 e4m3 dtype."""
    return FP8_DTYPE is not None


def quantize_fp8(x: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale to the e4m3 range (max 448) and cast; returns ``(values, scale)``."""
    if FP8_DTYPE is None:
        raise QuantizationInputError(
            "this PyTorch build has no float8_e4m3fn dtype; upgrade torch or use an integer format."
        )
    check_finite(x)
    finfo_max = torch.finfo(FP8_DTYPE).max
    x32 = x.float()
    absmax = x32.abs().amax(dim=-1, keepdim=True) if per_channel else x32.abs().amax().reshape(1, 1)
    scale = torch.where(absmax > 0, absmax / finfo_max, torch.ones_like(absmax))
    return (x32 / scale).to(FP8_DTYPE), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`."""
    return (values.to(torch.float32) * scale).to(dtype)
