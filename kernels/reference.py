"""Pure-torch reference implementations of every kernel.

They compute in float32 exactly the function the fused kernels compute (integer products
are exact in the kernels; here they are exact up to float32 rounding), and they run on any
device. Tensors in, tensors out: nothing here knows about modules, plans or pipelines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffq.kernels.packing import unpack


def dequantize_weight(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    cols: int,
    code_offset: int,
) -> torch.Tensor:
    """Unpack ``[rows, bytes]`` codes and restore float32 ``[rows, cols]`` weights.

    ``scale`` (and ``zero``) are ``[rows or 1, blocks]``; each block covers ``cols // blocks``
    consecutive columns (one block = per channel; ``rows == 1`` = per tensor).
    """
    codes = unpack(qweight, bits, cols).to(torch.float32) - code_offset
    rows = codes.shape[0]
    blocks = scale.shape[-1]
    grouped = codes.reshape(rows, blocks, cols // blocks)
    if zero is not None:
        grouped = grouped - zero.to(torch.float32).unsqueeze(-1)
    return (grouped * scale.to(torch.float32).unsqueeze(-1)).reshape(rows, cols)


def quantize_activations(
    x: torch.Tensor, bits: int, scale: torch.Tensor | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation quantization of ``x [tokens, features]``.

    With ``scale=None`` the scale is dynamic, one per token (or per token and ``group_size``
    features); otherwise the given static scale (a scalar tensor) is used. Returns signed
    integer values (as float32) and the scale broadcastable against them.
    """
    qmax = 2 ** (bits - 1) - 1
    x = x.to(torch.float32)
    if scale is None:
        if group_size is not None and x.shape[-1] % group_size == 0 and group_size < x.shape[-1]:
            grouped = x.reshape(x.shape[0], -1, group_size)
            amax = grouped.abs().amax(dim=-1, keepdim=True)
            s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
            q = torch.round(grouped / s).clamp(-qmax - 1, qmax)
            return q.reshape(x.shape), s.repeat_interleave(group_size, dim=1).reshape(x.shape)
        amax = x.abs().amax(dim=-1, keepdim=True)
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    else:
        s = scale.to(torch.float32).reshape(1, 1)
    return torch.round(x / s).clamp(-qmax - 1, qmax), s


def fake_quantize_activations(
    x: torch.Tensor, bits: int, scale: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """Quantize then dequantize activations, in float32."""
    q, s = quantize_activations(x, bits, scale, group_size)
    return q * s


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
) -> torch.Tensor:
    """``y = Q(x / smooth) @ W^T + (x / smooth) @ L1 @ L2 + bias`` with packed integer ``W``."""
    shape = x.shape
    x2 = x.reshape(-1, in_features).to(torch.float32)
    if smooth is not None:
        x2 = x2 / smooth.to(torch.float32)
    low_rank = None
    if lowrank_down is not None and lowrank_up is not None:
        low_rank = (x2 @ lowrank_down.to(torch.float32)) @ lowrank_up.to(torch.float32)
    if act_bits is not None:
        x2 = fake_quantize_activations(x2, act_bits, act_scale, act_group_size)
    weight = dequantize_weight(
        qweight, w_scale, w_zero, bits=w_bits, cols=in_features, code_offset=w_code_offset
    )
    y = x2 @ weight.t()
    if low_rank is not None:
        y = y + low_rank
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def _fake_quantize_channels(
    x: torch.Tensor, bits: int, scale: torch.Tensor | None, segments: tuple[int, ...], group_size: int | None = None
) -> torch.Tensor:
    """Fake-quantize ``[N, C, H, W]`` per pixel (dynamic; per pixel and ``group_size`` channels when
    given) or per channel segment (static scales)."""
    bounds = [0, *segments, x.shape[1]]
    parts = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        pixels = x[:, lo:hi].movedim(1, -1)
        flat = pixels.reshape(-1, pixels.shape[-1])
        part_scale = None if scale is None else scale.reshape(-1)[i]
        quantized = fake_quantize_activations(flat, bits, part_scale, group_size)
        parts.append(quantized.reshape(pixels.shape).movedim(-1, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


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
) -> torch.Tensor:
    """2-D convolution with packed integer weights: ``conv(Q(x / smooth), W) + up(conv(x / smooth,
    down)) + bias``, the low-rank branch being a convolution to ``r`` channels then a 1×1 one.

    Dynamic activation scales are per pixel (and ``act_group_size`` channels). ``act_segments``
    are channel indices where the input is split (a concatenation of two tensors); each part is
    quantized with its own scale (``act_scale[i]`` when static). ``smooth`` divides the input per
    channel; ``lowrank_down`` is ``[in/groups × kh × kw, r]`` (the weight's column order) and
    ``lowrank_up`` ``[r, out]``.
    """
    out_channels = weight_shape[0]
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    weight = dequantize_weight(
        qweight, w_scale, w_zero, bits=w_bits, cols=cols, code_offset=w_code_offset
    ).reshape(weight_shape)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    x32 = x.to(torch.float32)
    if smooth is not None:
        x32 = x32 / smooth.to(torch.float32).reshape(1, -1, 1, 1)
    low_rank = None
    if lowrank_down is not None and lowrank_up is not None:
        down = lowrank_down.to(torch.float32).t().reshape(-1, *weight_shape[1:])  # r filters of the weight's shape
        low_rank = torch.einsum("nrhw,ro->nohw", F.conv2d(x32, down, **geometry), lowrank_up.to(torch.float32))
    if act_bits is not None:
        x32 = _fake_quantize_channels(x32, act_bits, act_scale, act_segments, act_group_size)
    y = F.conv2d(x32, weight, None if bias is None else bias.to(torch.float32), **geometry)
    if low_rank is not None:
        y = y + low_rank
    assert y.shape[1] == out_channels
    return y.to(x.dtype)
