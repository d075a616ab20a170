"""CPU kernels: the reference's function on torch's own integer GEMM (``torch._int_mm``).

Activations are quantized to int8 codes exactly as :mod:`diffq.kernels.reference` quantizes
them (the same float32 operations, so the same codes), the weight codes are read from a signed
int8 ``[out, in]`` copy prepared once per layer (:func:`kernel_codes`; ``_int_mm`` reads its
transpose, a column-major view, as fast as a row-major copy), and every product and
sum of codes is an exact int32. The K dimension is cut where a scale changes (a weight group, an
activation group, a concatenation segment); each piece is one ``_int_mm`` whose int32 partial
sums are scaled in float32 and accumulated. Only that float32 scaling differs from the
reference's rounding, inside the error bound ``tests/test_kernels.py`` states.

Convolutions with static activation scales (and 1×1 ones with dynamic scales) are an int8
im2col followed by the same GEMM. Weight-only layers dequantize from the prepared codes and run
the float op, which is the reference's own computation without its unpacking.
:func:`unsupported_reason` says why any other call runs the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffq.kernels import reference
from diffq.kernels.packing import unpack

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def tap_major(taps: int, w_scale: torch.Tensor) -> bool:
    """Whether a convolution's prepared codes and patches use the column order (segment, tap,
    channel) rather than the stored (channel, tap): for kernels wider than 1×1 with one weight
    scale per output channel, whose patches are then one contiguous copy per segment (weight
    groups along the stored order would be scattered in it)."""
    return taps > 1 and w_scale.shape[-1] == 1


def conv_column_order(channels: int, taps: int, segments: tuple[int, ...]) -> torch.Tensor:
    """The stored column (``channel * taps + tap``) of each column in (segment, tap, channel) order."""
    bounds = [0, *segments, channels]
    parts = [
        (torch.arange(lo, hi).unsqueeze(0) * taps + torch.arange(taps).unsqueeze(1)).reshape(-1)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


def kernel_codes(
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    w_code_offset: int,
    cols: int,
    conv: tuple[int, int, tuple[int, ...]] | None = None,
) -> torch.Tensor | None:
    """The weight's signed values ``code - offset - zero`` as int8 ``[rows, cols]``, or ``None``
    where they do not fit int8 (8-bit asymmetric weights, which the CPU kernel leaves to the
    reference). ``conv``: ``(in_channels, kh * kw, activation segments)`` of a convolution with
    quantized activations, whose columns are put in the order its patches will have
    (:func:`tap_major`); weight-only convolutions keep the stored order."""
    codes = unpack(qweight, w_bits, cols).to(torch.int16) - w_code_offset
    if w_zero is not None:
        rows, blocks = codes.shape[0], w_zero.shape[-1]
        grouped = codes.reshape(rows, blocks, cols // blocks) - w_zero.to(torch.int16).unsqueeze(-1)
        codes = grouped.reshape(rows, cols)
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        return None
    if conv is not None and tap_major(conv[1], w_scale):
        codes = codes[:, conv_column_order(*conv)]
    return codes.to(torch.int8).contiguous()


def _weight_from_codes(codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Float32 ``[rows, cols]`` weights from :func:`kernel_codes`: the reference's dequantized
    values (one pass: int8 times float32 promotes to float32)."""
    rows, cols = codes.shape
    blocks = w_scale.shape[-1]
    return torch.mul(codes.view(rows, blocks, cols // blocks), w_scale.to(torch.float32).unsqueeze(-1)).view(rows, cols)


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dynamic codes of ``x [M, K]`` as the reference makes them: int8 codes, the scales ``[M, A]``
    and the width of each of the ``A`` scale groups."""
    qmax = 2 ** (bits - 1) - 1
    rows, cols = x.shape
    width = group_size if group_size is not None and cols % group_size == 0 and group_size < cols else cols
    grouped = x.reshape(rows, cols // width, width)
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = torch.round(grouped / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return codes.reshape(rows, cols), scale.squeeze(-1), width


def _quantize_static(x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.round(x / scale.to(torch.float32).reshape(1, 1)).clamp(-qmax - 1, qmax).to(torch.int8)


def _scaled_gemm(
    q: torch.Tensor,
    act_scale: torch.Tensor,
    act_bounds: list[int],
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_k s_a[m, k] q[m, k] * s_w[n, k] c[n, k] + bias[n]`` in float32 from exact int32
    partial sums (``weight``: the ``[N, K]`` codes ``c``).

    ``act_scale`` is ``[M or 1, A]``, its column ``a`` covering columns ``act_bounds[a] ..
    act_bounds[a + 1]`` of ``q``; ``w_scale`` is ``[N or 1, G]`` over ``G`` equal column groups.
    """
    cols = q.shape[1]
    codes = weight.t()  # [K, N], column-major
    width = cols // w_scale.shape[-1]
    bounds = sorted(set(act_bounds) | set(range(0, cols + 1, width)))
    w_cols = w_scale.to(torch.float32).t()  # [G, N or 1]
    a_cols = act_scale.to(torch.float32)
    bias32 = None if bias is None else bias.to(torch.float32)
    # Every partial sum is made float32 before it meets a scale: int32 × float32 with broadcasting
    # takes a slow type-promoting path in eager PyTorch (25-40× slower at [320, 3072]).
    if len(bounds) == 2:  # one scale along K: a single integer GEMM, scaled (and biased) in place
        y = torch._int_mm(q, codes).float()
        if a_cols.shape[0] == 1:
            y.mul_(a_cols[0, 0] * w_cols[0])
        else:
            y.mul_(a_cols[:, :1]).mul_(w_cols[0])
        return y if bias32 is None else y.add_(bias32)
    act_of = [next(i for i in range(len(act_bounds) - 1) if act_bounds[i] <= lo < act_bounds[i + 1])
              for lo in bounds[:-1]]
    n = codes.shape[1]
    if n <= 2 * _N_CHUNK:
        return _grouped_gemm(q, a_cols, codes, w_cols, bias32, bounds, act_of, width)
    y = torch.empty(q.shape[0], n, dtype=torch.float32)
    w_cols = w_cols.expand(-1, n)  # a per-tensor scale ([G, 1]) sliced like the others
    for n0 in range(0, n, _N_CHUNK):  # the accumulator of one column chunk stays in the cache
        cut = slice(n0, n0 + _N_CHUNK)
        chunk_bias = None if bias32 is None else bias32[cut]
        y[:, cut] = _grouped_gemm(q, a_cols, codes[:, cut], w_cols[:, cut], chunk_bias, bounds, act_of, width)
    return y


# Output columns per accumulator in the grouped GEMM: [M, 512] float32 partial sums stay in L2
# (at 320 x 3072 x 12288 with groups of 64 this halves the time of accumulating over all columns).
_N_CHUNK = 512


def _grouped_gemm(q, a_cols, codes, w_cols, bias32, bounds, act_of, width) -> torch.Tensor:
    """:func:`_scaled_gemm` over several K blocks, for the columns of ``codes [K, n]``."""
    uniform_act = a_cols.shape[1] == 1
    acc = None
    for lo, hi, a in zip(bounds[:-1], bounds[1:], act_of, strict=True):
        partial = torch._int_mm(q[:, lo:hi], codes[lo:hi]).float()
        if not uniform_act:
            partial.mul_(a_cols[:, a : a + 1])
        if acc is None:
            acc = partial.mul_(w_cols[lo // width])
        else:
            acc.addcmul_(partial, w_cols[lo // width])
    if uniform_act:
        acc.mul_(a_cols)
    return acc if bias32 is None else acc.add_(bias32)


def _divides(total: int, part_width: int) -> bool:
    return part_width > 0 and total % part_width == 0


def _common_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_bits: int,
    cols: int,
    act_bits: int | None,
) -> str | None:
    if x.device.type != "cpu":
        return f"tensors on {x.device.type}, the CPU kernels run on the CPU"
    if x.dtype not in _FLOATS:
        return f"activations in {x.dtype}"
    if x.numel() == 0:
        return "empty input"
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        return "qweight is not packed uint8 [out, packed in]"
    if w_scale.dim() != 2 or w_scale.shape[0] not in (1, qweight.shape[0]) or not _divides(cols, w_scale.shape[1]):
        return "weight scales are not [out or 1, blocks dividing the columns]"
    if act_bits is not None and not 2 <= act_bits <= 8:
        return f"{act_bits}-bit activations (int8 codes hold 2..8 bits)"
    if w_bits == 8 and w_zero is not None:
        return "8-bit asymmetric weights (code minus zero point spans 9 bits)"
    return None


def linear_unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    in_features: int,
    act_bits: int | None = None,
    codes: torch.Tensor | None = None,
    **_: object,
) -> str | None:
    """Why this linear call runs the reference instead of the CPU kernel (``None``: the kernel runs it)."""
    reason = _common_reason(x, qweight, w_scale, w_zero, w_bits, in_features, act_bits)
    if reason is None and x.shape[-1] != in_features:
        reason = "feature count mismatch"
    if reason is None and codes is not None and tuple(codes.shape) != (qweight.shape[0], in_features):
        reason = "prepared codes do not match the weight"
    return reason


def conv2d_unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    weight_shape: tuple[int, int, int, int],
    groups: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    act_bits: int | None = None,
    act_scale: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    **_: object,
) -> str | None:
    """Why this convolution runs the reference instead of the CPU kernel (``None``: the kernel runs it)."""
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    reason = _common_reason(x, qweight, w_scale, w_zero, w_bits, cols, act_bits)
    if reason is not None:
        return reason
    if x.dim() != 4:
        return "input is not [N, C, H, W]"
    if groups != 1:
        return f"groups={groups} (the integer im2col path is for groups=1)"
    if act_bits is not None and act_scale is None and (tuple(weight_shape[2:]), tuple(stride)) != ((1, 1), (1, 1)):
        return "dynamic per-pixel activation scales under a kernel wider than 1×1 vary along each patch"
    if act_bits is not None and act_scale is None and padding not in ("same", "valid") and any(padding):
        return "a padded 1×1 convolution with dynamic activation scales"
    if codes is not None and tuple(codes.shape) != (weight_shape[0], cols):
        return "prepared codes do not match the weight"
    return None


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
    """:func:`reference.quantized_linear` on integer GEMMs; ``codes`` is :func:`kernel_codes`
    of the weight (made here when not given). Unsupported calls run the reference."""
    kwargs = dict(w_bits=w_bits, w_code_offset=w_code_offset, in_features=in_features, bias=bias,
                  act_bits=act_bits, act_scale=act_scale, act_group_size=act_group_size, smooth=smooth,
                  lowrank_down=lowrank_down, lowrank_up=lowrank_up)
    if linear_unsupported_reason(x, qweight, w_scale, w_zero, codes=codes, **kwargs) is not None:
        return reference.quantized_linear(x, qweight, w_scale, w_zero, **kwargs)
    if codes is None:  # not prepared by a module: made for this call
        codes = kernel_codes(qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, cols=in_features)
    shape = x.shape
    x2 = x.reshape(-1, in_features).to(torch.float32)
    if smooth is not None:
        x2 = x2 / smooth.to(torch.float32)
    low_rank = None
    if lowrank_down is not None and lowrank_up is not None:
        low_rank = (x2 @ lowrank_down.to(torch.float32)) @ lowrank_up.to(torch.float32)
    if act_bits is None:
        weight = _weight_from_codes(codes, w_scale).t()
        y = x2 @ weight if bias is None else torch.addmm(bias.to(torch.float32), x2, weight)
    elif act_scale is None:
        q, scale, width = _quantize_rows(x2, act_bits, act_group_size)
        y = _scaled_gemm(q, scale, list(range(0, in_features + 1, width)), codes, w_scale, bias)
    else:
        q = _quantize_static(x2, act_bits, act_scale)
        y = _scaled_gemm(q, act_scale.reshape(1, 1), [0, in_features], codes, w_scale, bias)
    if low_rank is not None:
        y = y + low_rank
    return y.to(x.dtype).reshape(*shape[:-1], codes.shape[0])


def _same_padding(size: tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) of ``padding='same'`` (stride 1), as PyTorch pads."""
    pads = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _im2col(
    q: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    segments: tuple[int, ...],
    tap_major: bool,
) -> tuple[torch.Tensor, int, int]:
    """Patches of int8 ``q [N, C, H, W]`` as ``[N * Ho * Wo, C * kh * kw]``: columns in the stored
    (channel, tap) order, or in (segment, tap, channel) order when ``tap_major``."""
    if padding == "valid":
        padding = (0, 0)
    if isinstance(padding, str):
        pads = _same_padding(q.shape[2:], kernel, dilation)
    else:
        pads = (padding[1], padding[1], padding[0], padding[0])
    if any(pads):
        q = F.pad(q, pads)
    n, c, h, w = q.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    pixels = q.permute(0, 2, 3, 1)  # NHWC view
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return pixels.reshape(n * out_h * out_w, c), out_h, out_w
    if tap_major:  # one strided copy per segment, channels innermost
        bounds = [0, *segments, c]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = pixels[..., lo:hi].contiguous()
            s_n, s_h, s_w, s_c = part.stride()
            view = part.as_strided((n, out_h, out_w, kh, kw, hi - lo),
                                   (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
            parts.append(view.reshape(n * out_h * out_w, kh * kw * (hi - lo)))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), out_h, out_w
    patches = torch.empty(n, out_h, out_w, c, kh * kw, dtype=q.dtype)
    for i in range(kh):  # stored order: one strided copy per tap
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            patches[..., i * kw + j] = pixels[:, rows, cols, :]
    return patches.reshape(n * out_h * out_w, c * kh * kw), out_h, out_w


def _conv_activation_codes(
    x: torch.Tensor,
    bits: int,
    act_scale: torch.Tensor | None,
    segments: tuple[int, ...],
    group_size: int | None,
    taps: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int], bool]:
    """Int8 codes of ``x [N, C, H, W]`` per channel segment as the reference makes them, with the
    scales ``[rows or 1, A]`` and their column bounds in the im2col layout (``taps`` = kh × kw).
    Returns ``(codes [N, C, H, W] or pixel rows, scales, bounds, codes are pixel rows)``."""
    bounds = [0, *segments, x.shape[1]]
    if act_scale is not None:
        flat_scales = act_scale.reshape(-1)
        parts = [_quantize_static(x[:, lo:hi], bits, flat_scales[i]) for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        codes = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        scales = flat_scales[: len(parts)].to(torch.float32).reshape(1, -1)
        return codes, scales, [b * taps for b in bounds], False
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # dynamic: 1×1 kernels only (taps == 1)
    code_parts, scale_parts, col_bounds = [], [], [0]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        q, scale, width = _quantize_rows(pixels[:, lo:hi].contiguous(), bits, group_size)
        code_parts.append(q)
        scale_parts.append(scale)
        col_bounds += list(range(lo + width, hi + 1, width))
    codes = code_parts[0] if len(code_parts) == 1 else torch.cat(code_parts, dim=1)
    return codes, torch.cat(scale_parts, dim=1), col_bounds, True


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
    """:func:`reference.quantized_conv2d` as an int8 im2col and integer GEMMs (weight-only: the
    float convolution of the dequantized weight). Unsupported calls run the reference."""
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    kwargs = dict(w_bits=w_bits, w_code_offset=w_code_offset, weight_shape=weight_shape, bias=bias,
                  act_bits=act_bits, act_scale=act_scale, act_segments=act_segments,
                  act_group_size=act_group_size, smooth=smooth, lowrank_down=lowrank_down, lowrank_up=lowrank_up, **geometry)
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    if conv2d_unsupported_reason(x, qweight, w_scale, w_zero, codes=codes, **kwargs) is not None:
        return reference.quantized_conv2d(x, qweight, w_scale, w_zero, **kwargs)
    if codes is None:  # not prepared by a module: made for this call
        conv = None if act_bits is None else (weight_shape[1], weight_shape[2] * weight_shape[3], tuple(act_segments))
        codes = kernel_codes(qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, cols=cols, conv=conv)
    x32 = x.to(torch.float32)
    if smooth is not None:
        x32 = x32 / smooth.to(torch.float32).reshape(1, -1, 1, 1)
    low_rank = None
    if lowrank_down is not None and lowrank_up is not None:
        down = lowrank_down.to(torch.float32).t().reshape(-1, *weight_shape[1:])
        low_rank = torch.einsum("nrhw,ro->nohw", F.conv2d(x32, down, **geometry), lowrank_up.to(torch.float32))
    bias32 = None if bias is None else bias.to(torch.float32)
    if act_bits is None:
        weight = _weight_from_codes(codes, w_scale).reshape(weight_shape)
        y = F.conv2d(x32, weight, bias32, **geometry)
    else:
        kernel = tuple(weight_shape[2:])
        q, scales, bounds, as_rows = _conv_activation_codes(
            x32, act_bits, act_scale, act_segments, act_group_size, math.prod(kernel)
        )
        if as_rows:
            patches, out_h, out_w = q, x.shape[2], x.shape[3]
        else:
            patches, out_h, out_w = _im2col(q, kernel, stride, padding, dilation, act_segments,
                                            tap_major(math.prod(kernel), w_scale))
        flat = _scaled_gemm(patches, scales, bounds, codes, w_scale, bias32)
        y = flat.reshape(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)
    if low_rank is not None:
        y = y + low_rank
    return y.contiguous().to(x.dtype)
