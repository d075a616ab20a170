"""Quantized linear layers and inputs shared by the kernel tests, and the error bound they check.

The bound is the one ``tests/test_kernels.py``'s docstring derives: integer products and sums
exact, float32 rounding in scaling and adding partial sums, the low-rank branch's and the
output dtype's rounding on top.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffq.kernels import pack, reference, unpack

# Relative error of rounding float32 to each dtype. bfloat16 is 2**-7, not 2**-8: the Triton 3.8
# interpreter converts float32 to bfloat16 by truncating the mantissa (``cast_impl``), which
# errs by up to one bf16 ulp; on a GPU the conversion rounds to nearest.
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-24}


@dataclass(frozen=True)
class Case:
    """One quantized linear layer and input."""

    name: str
    lead: tuple[int, ...]  # leading dims of x (M tokens in all)
    n: int
    k: int
    w_bits: int
    w_group: int | None  # None: per channel
    asym: bool
    act_bits: int | None
    act_group: int | None = None
    static: bool = False
    rank: int = 0
    bias: bool = False
    smooth: bool = False
    dtype: torch.dtype = torch.float16


CASES = [
    Case("w4a8-g64-dyn-r16-bias-smooth", (37,), 72, 192, 4, 64, False, 8, rank=16, bias=True, smooth=True),
    Case("w4a8-ch-static-r0-fp32", (37,), 72, 128, 4, None, False, 8, static=True, dtype=torch.float32),
    Case("w4a4-g64-actg64-r16-bias-bf16", (37,), 72, 192, 4, 64, False, 4, act_group=64, rank=16, bias=True,
         dtype=torch.bfloat16),
    Case("w4a4-ch-dyn-bias-3d", (3, 13), 72, 128, 4, None, False, 4, bias=True),
    Case("w4a8-g64-asym-dyn", (37,), 72, 192, 4, 64, True, 8, smooth=True),
    Case("w8a8-g64-asym-dyn-r16-fp32", (37,), 72, 192, 8, 64, True, 8, rank=16, dtype=torch.float32),
    Case("w8a8-ch-static-r16-bias-bf16", (37,), 72, 128, 8, None, False, 8, static=True, rank=16, bias=True,
         dtype=torch.bfloat16),
    Case("w4a16-g64-r16-bias-smooth", (37,), 72, 192, 4, 64, False, None, rank=16, bias=True, smooth=True),
    Case("w4a16-ch-asym-bf16", (37,), 72, 128, 4, None, True, None, dtype=torch.bfloat16),
    Case("w8a16-ch-r16-fp32", (37,), 72, 128, 8, None, False, None, rank=16, dtype=torch.float32),
]


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Random codes, scales, zero points, factors and input for ``case``."""
    blocks = 1 if case.w_group is None else case.k // case.w_group
    codes = torch.randint(0, 2**case.w_bits, (case.n, case.k), dtype=torch.uint8)
    w_scale = ((torch.rand(case.n, blocks) + 0.5) * 0.02).to(case.dtype)
    w_zero = torch.randint(0, 2**case.w_bits, (case.n, blocks), dtype=torch.uint8) if case.asym else None
    x = torch.randn(*case.lead, case.k).to(case.dtype)
    kwargs = dict(
        w_bits=case.w_bits,
        w_code_offset=0 if case.asym else 2 ** (case.w_bits - 1),
        in_features=case.k,
        act_bits=case.act_bits,
        act_group_size=case.act_group,
        bias=torch.randn(case.n).to(case.dtype) if case.bias else None,
        smooth=(torch.rand(case.k) + 0.5).to(case.dtype) if case.smooth else None,
    )
    if case.static:  # clips the largest activations, so the clamp is exercised
        kwargs["act_scale"] = torch.tensor(0.7 * 3.0 / (2 ** (case.act_bits - 1) - 1))
    if case.rank:
        kwargs["lowrank_down"] = (torch.randn(case.k, case.rank) / case.k**0.5).to(case.dtype)
        kwargs["lowrank_up"] = (torch.randn(case.rank, case.n) / case.rank**0.5).to(case.dtype)
    return x, pack(codes, case.w_bits), w_scale, w_zero, kwargs


@dataclass(frozen=True)
class ConvCase:
    """One quantized convolution for the implicit-GEMM kernel: weights as ``w_bits``/``w_group``/``asym``,
    activations static (``act_bits``, one scale per segment), dynamic (per pixel and ``act_group``
    channels) or 16-bit (``None``)."""

    name: str
    x: tuple[int, int, int, int]
    out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    w_bits: int
    w_group: int | None
    act_bits: int | None
    dilation: tuple[int, int] = (1, 1)
    asym: bool = False
    split: int | None = None
    rank: int = 0
    bias: bool = False
    smooth: bool = False
    dtype: torch.dtype = torch.float16
    channels_last: bool = False
    dynamic: bool = False
    act_group: int | None = None


IMPLICIT_GEMM_CASES = [
    ConvCase("w4a8-g64-3x3-r16-bias-smooth", (2, 64, 5, 6), 40, (3, 3), (1, 1), (1, 1), 4, 64, 8, rank=16,
             bias=True, smooth=True),
    ConvCase("w8a8-ch-3x3-s2-split-bf16", (1, 64, 7, 6), 24, (3, 3), (2, 2), (1, 1), 8, None, 8, split=32,
             bias=True, dtype=torch.bfloat16),
    ConvCase("w4a8-g64-asym-3x3-same-dil2-fp32", (1, 64, 6, 5), 24, (3, 3), (1, 1), "same", 4, 64, 8,
             dilation=(2, 2), asym=True, dtype=torch.float32),
    ConvCase("w4a4-ch-1x1-padded-split-cl", (2, 64, 3, 4), 24, (1, 1), (1, 1), (1, 1), 4, None, 4, split=32,
             smooth=True, channels_last=True),
    ConvCase("w4a16-g64-3x3-r16-bias-smooth", (2, 64, 5, 4), 40, (3, 3), (1, 1), (1, 1), 4, 64, None, rank=16,
             bias=True, smooth=True),
    ConvCase("w8a16-ch-asym-3x3-s2-valid-bf16", (1, 32, 7, 7), 24, (3, 3), (2, 2), "valid", 8, None, None,
             asym=True, dtype=torch.bfloat16),
    ConvCase("w4a16-g64-4x4-s2-r16-fp32", (1, 32, 6, 6), 24, (4, 4), (2, 2), (1, 1), 4, 64, None, rank=16,
             dtype=torch.float32),
    # Dynamic activation scales (W4A4's per pixel and group of 64 channels): fake-quantized, then 16-bit.
    ConvCase("w4a4-g64-actg64-3x3-r16-bias-smooth", (2, 128, 5, 4), 40, (3, 3), (1, 1), (1, 1), 4, 64, 4,
             rank=16, bias=True, smooth=True, dynamic=True, act_group=64),
    ConvCase("w4a4-ch-dyn-3x3-s2-bf16-cl", (1, 64, 7, 6), 24, (3, 3), (2, 2), (1, 1), 4, None, 4,
             dtype=torch.bfloat16, channels_last=True, dynamic=True),
    ConvCase("w8a8-g64-asym-actg32-split-same-fp32", (1, 64, 6, 5), 24, (3, 3), (1, 1), "same", 8, 64, 8,
             asym=True, split=32, dtype=torch.float32, dynamic=True, act_group=32),
    ConvCase("w4a4-ch-dyn-1x1-padded-smooth", (2, 64, 3, 4), 24, (1, 1), (1, 1), (1, 1), 4, None, 4,
             smooth=True, dynamic=True, act_group=32),
]


def conv_inputs(case: ConvCase):
    """Random codes, scales, zero points, factors and input for ``case``."""
    n, channels, h, w = case.x
    cols = channels * case.kernel[0] * case.kernel[1]
    blocks = 1 if case.w_group is None else cols // case.w_group
    codes = torch.randint(0, 2**case.w_bits, (case.out, cols), dtype=torch.uint8)
    w_scale = ((torch.rand(case.out, blocks) + 0.5) * 0.02).to(case.dtype)
    w_zero = torch.randint(0, 2**case.w_bits, (case.out, blocks), dtype=torch.uint8) if case.asym else None
    x = torch.randn(*case.x).to(case.dtype)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    kw = dict(w_bits=case.w_bits, w_code_offset=0 if case.asym else 2 ** (case.w_bits - 1),
              weight_shape=(case.out, channels, *case.kernel), stride=case.stride, padding=case.padding,
              dilation=case.dilation, groups=1, act_bits=case.act_bits, act_group_size=case.act_group,
              act_segments=(case.split,) if case.split else (),
              bias=torch.randn(case.out).to(case.dtype) if case.bias else None,
              smooth=(torch.rand(channels) + 0.5).to(case.dtype) if case.smooth else None)
    if case.act_bits is not None and not case.dynamic:  # clips the largest activations, so the clamp is exercised
        segments = 2 if case.split else 1
        kw["act_scale"] = torch.tensor([0.7, 0.5][:segments]) * 3.0 / (2 ** (case.act_bits - 1) - 1)
    if case.rank:
        kw["lowrank_down"] = (torch.randn(cols, case.rank) / cols**0.5).to(case.dtype)
        kw["lowrank_up"] = (torch.randn(case.rank, case.out) / case.rank**0.5).to(case.dtype)
    return x, pack(codes, case.w_bits), w_scale, w_zero, kw


def dequantize64(qweight, w_scale, w_zero, *, bits: int, cols: int, code_offset: int) -> torch.Tensor:
    """Float64 ``(code - offset - zero) * scale``, ``[rows, cols]``."""
    v = unpack(qweight, bits, cols).double() - code_offset
    rows, blocks = v.shape[0], w_scale.shape[1]
    v = v.reshape(rows, blocks, cols // blocks)
    if w_zero is not None:
        v = v - w_zero.double().unsqueeze(-1)
    return (v * w_scale.double().unsqueeze(-1)).reshape(rows, cols)


def expected_and_tolerance(x, qweight, w_scale, w_zero, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference function in float64, and the error bound of the module docstring."""
    K = kw["in_features"]
    x2 = x.reshape(-1, K)
    smooth = kw.get("smooth")
    xs64 = x2.double() if smooth is None else x2.double() / smooth.double()
    w64 = dequantize64(qweight, w_scale, w_zero, bits=kw["w_bits"], cols=K, code_offset=kw["w_code_offset"])
    u_out = UNIT[x.dtype]
    if kw["act_bits"] is None:
        a64 = xs64
        u_act = u_out if smooth is not None else 0.0
    else:  # activation codes and scales as the float32 reference defines them
        xs32 = x2.float() if smooth is None else x2.float() / smooth.float()
        q, s = reference.quantize_activations(xs32, kw["act_bits"], kw.get("act_scale"), kw["act_group_size"])
        a64 = q.double() * s.double()
        u_act = 0.0
    return _bound(a64, xs64, w64, u_act, kw, K, UNIT[x.dtype])


def conv_expected_and_tolerance(x, qweight, w_scale, w_zero, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expected_and_tolerance` for a convolution (``kw``: the reference's keyword arguments):
    the float64 function over the patches (``F.unfold``, the weight's column order), rows are the
    output pixels ``(n, oh, ow)``. Activations are quantized per channel segment with its static
    scale, or with dynamic ones per pixel (and ``act_group_size`` channels): the kernel fake-quantizes
    those and rounds them to ``x``'s dtype, an error of ``u_x |q s| @ |W|^T``."""
    out, channels, kh, kw_ = kw["weight_shape"]
    K = channels * kh * kw_
    smooth = kw.get("smooth")
    x64 = x.double()
    xs64 = x64 if smooth is None else x64 / smooth.double().reshape(1, -1, 1, 1)
    if kw["act_bits"] is None:
        a64, u_act = xs64, (UNIT[x.dtype] if smooth is not None else 0.0)
    else:  # the float32 reference's codes, per channel segment
        xs32 = x.float() if smooth is None else x.float() / smooth.float().reshape(1, -1, 1, 1)
        bounds = [0, *kw.get("act_segments", ()), channels]
        static = kw.get("act_scale")
        parts = []
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            pixels = xs32[:, lo:hi].movedim(1, -1)
            if static is None:  # dynamic: per pixel (and group of channels)
                q, s = reference.quantize_activations(pixels.reshape(-1, hi - lo), kw["act_bits"], None,
                                                      kw.get("act_group_size"))
            else:
                q, s = reference.quantize_activations(pixels.reshape(-1, 1), kw["act_bits"], static.reshape(-1)[i])
            parts.append((q.double() * s.double()).reshape(pixels.shape).movedim(-1, 1))
        a64 = torch.cat(parts, dim=1)
        u_act = UNIT[x.dtype] if static is None and x.dtype != torch.float32 else 0.0
    padding = kw["padding"]
    if padding == "same":
        padding = tuple(d * (k - 1) // 2 for k, d in zip((kh, kw_), kw["dilation"], strict=True))
    elif padding == "valid":
        padding = (0, 0)

    def patches(t):
        cols = F.unfold(t, (kh, kw_), dilation=kw["dilation"], padding=padding, stride=kw["stride"])
        return cols.transpose(1, 2).reshape(-1, K)

    w64 = dequantize64(qweight, w_scale, w_zero, bits=kw["w_bits"], cols=K, code_offset=kw["w_code_offset"])
    return _bound(patches(a64), patches(xs64), w64, u_act, kw, K, UNIT[x.dtype])


def _bound(a64, xs64, w64, u_act: float, kw: dict, K: int, u_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result and its error bound, from the activations (as the GEMM sees them) and the weight."""
    main = a64 @ w64.t()
    mag = a64.abs() @ w64.abs().t()
    err = u_act * mag
    y, rank = main, 0
    down, up = kw.get("lowrank_down"), kw.get("lowrank_up")
    if down is not None:
        rank = down.shape[1]
        y = y + (xs64 @ down.double()) @ up.double()
        mag_lr = (xs64.abs() @ down.double().abs()) @ up.double().abs()
        u_lr = 0.0 if down.dtype == torch.float32 else UNIT[down.dtype]
        err = err + 2 * u_lr * mag_lr
        mag = mag + mag_lr
    if kw.get("bias") is not None:
        y = y + kw["bias"].double()
        mag = mag + kw["bias"].double().abs()
    gamma = (K + rank + 8) * 2.0**-24
    err = err + gamma * mag
    return y, u_out * y.abs() + (1 + u_out) * err
