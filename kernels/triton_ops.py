"""Triton kernels for quantized linear and convolution layers; :mod:`reference` defines them.

Three kernels for linear layers, picked per call by :func:`quantized_linear_triton`:

* ``_act_kernel`` — the activation pass: ``x / smooth``, symmetric quantization to int8 values
  (any width 2..8 bits) with a dynamic scale per token or per token group, or a static scale,
  and the low-rank down-projection ``(x / smooth) @ L1`` in the same loop over ``x``.
  With static or per-group scales each element of ``x`` is read once; a dynamic per-token scale
  needs the row's absolute maximum before any value can be rounded, so that case reads the
  row tile a second time (``BLOCK_M x K`` elements, which the first pass leaves in L2).
* ``_int_gemm_kernel`` — W4A8 / W4A4 / W8A8: packed codes are unpacked to int8 in registers,
  ``int8 x int8 -> int32`` ``tl.dot``; with group-wise weight (or activation) scales each
  K tile's exact integer partial sum is multiplied by its group scales in the K loop, otherwise
  the int32 sum is scaled once. The epilogue applies token x weight scales, adds the low-rank
  up-projection ``(x L1) @ L2`` and the bias.
* ``_weight_only_kernel`` — W4A16 / W8A16: codes are unpacked in registers to their integer
  values ``code - offset - zero`` in the activation dtype (exact: ``|v| <= 255``), a float
  ``tl.dot`` (fp32 accumulate) per K tile, the group scale multiplies each tile's partial sum.

Numerics versus the float32 reference: integer products and sums are exact; the low-rank
branch rounds ``x / smooth`` to ``L1``'s dtype and ``x L1`` to ``L2``'s dtype (16-bit tensor
cores, fp32 accumulate); the weight-only kernel rounds ``x / smooth`` back to ``x``'s dtype
when ``smooth`` is given. Divisions use IEEE round-to-nearest (``tl.div_rn``) and rounding is
half-to-even, so quantized activations and their scales equal the reference's bit for bit.

What runs on Triton (:func:`unsupported_reason` says why anything else runs the reference):
CUDA tensors (CPU tensors only under the interpreter); ``x`` in float16/bfloat16/float32;
4- or 8-bit weights with the stored code offset ``0`` or ``2**(bits - 1)``, symmetric or with
uint8 zero points; scales ``[out or 1, blocks]`` in a float dtype; activations of 2..8 bits
(static scalar scale, or dynamic per token, or per token group of a power of two in 32..1024),
or none (weight-only); ``in_features <= 32768`` with quantized activations; where weight or
activation scales are group-wise, the columns over which both are constant (their gcd) must
be divisible by 32 (16 for weight-only); low-rank factors of rank <= 256 in a float dtype.
Everything else -- 2- and 3-bit weights, 16-bit "activation bits", odd groups, other dtypes
(e.g. float64) -- runs :func:`reference.quantized_linear` for that call.

Tiles: on CUDA each GEMM autotunes once per shape bucket (``triton.autotune`` over
``INT_CONFIGS`` / ``WEIGHT_ONLY_CONFIGS`` / ``CONV_CONFIGS``, pruned per call by
:func:`prune_gemm_configs` / :func:`prune_conv_configs`; the winners are kept per GPU name in
``~/.cache/diffq/autotune.json``; ``DIFFQ_AUTOTUNE=0`` turns it off); the interpreter, float32
weight-only calls and callers passing ``blocks`` use the fixed :func:`_gemm_blocks` /
:func:`_conv_blocks`.

Convolutions (:func:`quantized_conv2d_triton`): unpadded 1x1 ones run as linear layers over their
pixels; every other one -- k x k, strided, dilated, padded, over a skip concatenation with a
static scale per part -- as an implicit GEMM (:func:`implicit_gemm_conv2d`): ``_conv_kernel``
gathers each ``[pixels, channel x tap]`` patch tile straight from ``x`` (in the weight's stored
column order, so weight groups and the packed codes are the linear layers'), quantizes it as it
loads it with the static scale and runs the integer GEMM and epilogue of ``_int_gemm_kernel``
(or the weight-only one's), after ``_conv_lowrank_kernel`` for a low-rank branch. Dynamic
activation scales (W4A4: per pixel and 64 channels) differ between the pixels of one patch, so no
integer sum can be scaled once: ``_act_kernel`` first fake-quantizes ``x`` per pixel (the
reference's codes and scales, their product rounded to ``x``'s dtype) and the weight-only GEMM
runs on those patches, at 16-bit tensor-core rate with 4-bit weight traffic. An int4 x int4 path
would need weight groups that do not cross taps, which the stored column order (the reference's)
does not have. Grouped convolutions stay on the reference. The patch loads are 16-bit gathers (a
K tile spans several taps), not vector copies.

Under ``TRITON_INTERPRET=1`` (tests on CPU) every float ``tl.dot`` casts its operands to
float32 after the 16-bit rounding above, so the interpreter computes the same numbers;
the int8 ``tl.dot`` with an int32 accumulator runs as is (numpy integer matmul, exact).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from diffq.kernels import reference
from diffq.kernels.packing import packed_cols

__all__ = [
    "quantized_linear_triton",
    "quantized_conv2d_triton",
    "implicit_gemm_conv2d",
    "fake_quantize_pixels",
    "unsupported_reason",
    "conv2d_unsupported_reason",
    "act_quant_lowrank",
    "int_gemm",
    "weight_only_gemm",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 256
_MAX_INT_K = 32768  # keeps every int32 partial sum (|q| <= 128, |w| <= 255) below 2**31


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _fdot(a, b, acc, FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` in float32; fp32 operands use IEEE products (no TF32)."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _round_half_even(v):
    """``torch.round`` for ``|v| < 2**22`` (larger values are clamped by every caller)."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quantize_store(q_ptr, xs, scale, offs_m, offs_k, mask, stride_qm, QMAX: tl.constexpr, FAKE: tl.constexpr):
    """Store ``q = clamp(round(xs / scale))`` as int8, or with ``FAKE`` the float32 product ``q * scale``
    in ``q_ptr``'s dtype (``scale`` broadcasts against ``xs``)."""
    v = _round_half_even(tl.div_rn(xs, scale))
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    if FAKE:
        v = (v * scale).to(q_ptr.dtype.element_ty)
    else:
        v = v.to(tl.int8)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], v, mask=mask)


@triton.jit
def _dynamic_scale(amax, QMAX: tl.constexpr):
    """``amax / qmax`` (1 where ``amax == 0``), correctly rounded like the reference."""
    return tl.where(amax > 0, tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 1.0)


@triton.jit
def _load_smoothed(x_ptr, smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    """A float32 ``[BLOCK_M, BLOCK_K]`` tile of ``x / smooth`` (zeros outside) and its mask."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32)
        xs = tl.div_rn(xs, sm[None, :])
    return xs, mask


@triton.jit
def _load_codes(qw_ptr, offs_n, k0, N, K, KP, stride_wn, W_BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Unsigned codes of weight rows ``offs_n``, columns ``k0 .. k0 + BLOCK_K``, as ``[BLOCK_K, BLOCK_N]``.

    ``KP`` is the packed row length in bytes (``qweight.shape[1]``), a runtime argument so that
    the JIT's divisibility specialization sees it: masking by ``(K + 1) // 2`` instead hid that
    the mask is constant over 16-byte runs and the 4-bit codes were read one byte per load
    (``LDG.E.U8``); masked by ``KP`` they are read as 128-bit ``cp.async`` copies.
    """
    if W_BITS == 4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (kb[None, :] < KP)
        packed = tl.load(qw_ptr + offs_n[:, None] * stride_wn + kb[None, :], mask=mask, other=0)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))  # low nibble first
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        codes = tl.load(qw_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
    return tl.trans(codes)


@triton.jit
def _load_row_vector(ptr, offs_n, g, N, stride_n, stride_g):
    """``ptr[n, g]`` for the tile's output channels, as float32 (0 outside)."""
    return tl.load(ptr + offs_n * stride_n + g * stride_g, mask=offs_n < N, other=0).to(tl.float32)


@triton.jit
def _code_correction(wz_ptr, offs_n, g, N, OFFSET, stride_zn, stride_zg, HAS_ZERO: tl.constexpr,
                     CENTER: tl.constexpr, BLOCK_N: tl.constexpr):
    """``CENTER - offset - zero[n, g]``: what turns centered codes into weight values."""
    c = tl.full([BLOCK_N], CENTER, tl.int32) - OFFSET
    if HAS_ZERO:
        c -= tl.load(wz_ptr + offs_n * stride_zn + g * stride_zg, mask=offs_n < N, other=0).to(tl.int32)
    return c


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of output tiles."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _epilogue_store(acc, offs_m, offs_n, M, N, R, t_ptr, l2_ptr, bias_ptr, y_ptr,
                    stride_tm, stride_l2r, stride_l2n, stride_ym,
                    HAS_LORA: tl.constexpr, L2_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
                    R_PAD: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + (x L1) @ L2 + bias``, stored in ``y``'s dtype."""
    if HAS_LORA:
        R_TILE: tl.constexpr = min(R_PAD, 32)
        for r0 in tl.range(0, R_PAD, R_TILE, num_stages=1):  # a loop, not unrolled: loads stay in order
            offs_r = r0 + tl.arange(0, R_TILE)
            t_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], mask=t_mask, other=0.0)
            u_mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
            u = tl.load(l2_ptr + offs_r[:, None] * stride_l2r + offs_n[None, :] * stride_l2n, mask=u_mask, other=0.0)
            acc = _fdot(t.to(u.dtype), u, acc, L2_FP32, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _act_kernel(
    x_ptr, smooth_ptr, l1_ptr, static_ptr, q_ptr, s_ptr, t_ptr,
    M, K, R, stride_xm, stride_l1k, stride_l1r, stride_qm, stride_sm, stride_tm,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, L1_FP32: tl.constexpr, QUANT: tl.constexpr,
    STATIC: tl.constexpr, A_GROUPED: tl.constexpr, QMAX: tl.constexpr, FAKE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Smooth + quantize ``x`` to int8 values with scales (``FAKE``: to their products, in ``q``'s
    float dtype), and ``t = (x / smooth) @ L1``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    t = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xs, mask = _load_smoothed(x_ptr, smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH)
        if HAS_LORA:
            l1_mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
            l1 = tl.load(l1_ptr + offs_k[:, None] * stride_l1k + offs_r[None, :] * stride_l1r, mask=l1_mask, other=0.0)
            t = _fdot(xs.to(l1.dtype), l1, t, L1_FP32, INTERPRET)
        if QUANT:
            if STATIC:
                _quantize_store(q_ptr, xs, tl.load(static_ptr).to(tl.float32), offs_m, offs_k, mask, stride_qm, QMAX, FAKE)
            elif A_GROUPED:  # BLOCK_K is the activation group
                s = _dynamic_scale(tl.max(tl.abs(xs), axis=1), QMAX)
                tl.store(s_ptr + offs_m * stride_sm + k0 // BLOCK_K, s, mask=offs_m < M)
                _quantize_store(q_ptr, xs, s[:, None], offs_m, offs_k, mask, stride_qm, QMAX, FAKE)
            else:
                amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
    if HAS_LORA:
        t_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t, mask=t_mask)
    if QUANT and not STATIC and not A_GROUPED:  # dynamic per token: second pass over the row tile
        s = _dynamic_scale(amax, QMAX)
        tl.store(s_ptr + offs_m * stride_sm, s, mask=offs_m < M)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xs, mask = _load_smoothed(x_ptr, smooth_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH)
            _quantize_store(q_ptr, xs, s[:, None], offs_m, offs_k, mask, stride_qm, QMAX, FAKE)


@triton.jit
def _int_gemm_kernel(
    q_ptr, xs_ptr, qw_ptr, ws_ptr, wz_ptr, t_ptr, l2_ptr, bias_ptr, y_ptr,
    M, N, K, KP, R, OFFSET, W_GROUP, A_GROUP, M_BUCKET,
    stride_qm, stride_xsm, stride_xsg, stride_wn, stride_wsn, stride_wsg, stride_wzn, stride_wzg,
    stride_tm, stride_l2r, stride_l2n, stride_ym,
    W_BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_CORR: tl.constexpr,
    W_GROUPED: tl.constexpr, A_GROUPED: tl.constexpr, HAS_LORA: tl.constexpr, L2_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, R_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y = s_x s_w (q_x @ w^T) + t @ L2 + bias`` with int8 activations and packed 4/8-bit weights."""
    CENTER: tl.constexpr = 8 if W_BITS == 4 else 128
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        a = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], mask=a_mask, other=0)
        codes = _load_codes(qw_ptr, offs_n, k0, N, K, KP, stride_wn, W_BITS, BLOCK_N, BLOCK_K)
        if W_BITS == 4:
            b = codes.to(tl.int8) - CENTER
        else:
            b = (codes ^ 0x80).to(tl.int8, bitcast=True)  # code - 128
        if W_GROUPED or A_GROUPED:  # BLOCK_K divides both groups: scale this tile's exact sum
            p = tl.dot(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32))
            if HAS_CORR:
                c = _code_correction(wz_ptr, offs_n, k0 // W_GROUP, N, OFFSET, stride_wzn, stride_wzg,
                                     HAS_ZERO, CENTER, BLOCK_N)
                p += tl.sum(a.to(tl.int32), axis=1)[:, None] * c[None, :]
            pf = p.to(tl.float32)
            if W_GROUPED:
                pf *= _load_row_vector(ws_ptr, offs_n, k0 // W_GROUP, N, stride_wsn, stride_wsg)[None, :]
            if A_GROUPED:
                pf *= _load_row_vector(xs_ptr, offs_m, k0 // A_GROUP, M, stride_xsm, stride_xsg)[:, None]
            acc += pf
        else:
            acc_i = tl.dot(a, b, acc_i)
            if HAS_CORR:
                rsum += tl.sum(a.to(tl.int32), axis=1)
    if not (W_GROUPED or A_GROUPED):
        if HAS_CORR:
            c = _code_correction(wz_ptr, offs_n, 0, N, OFFSET, stride_wzn, stride_wzg, HAS_ZERO, CENTER, BLOCK_N)
            acc_i += rsum[:, None] * c[None, :]
        acc = acc_i.to(tl.float32)
    if not W_GROUPED:
        acc *= _load_row_vector(ws_ptr, offs_n, 0, N, stride_wsn, stride_wsg)[None, :]
    if not A_GROUPED:
        acc *= _load_row_vector(xs_ptr, offs_m, 0, M, stride_xsm, stride_xsg)[:, None]
    _epilogue_store(acc, offs_m, offs_n, M, N, R, t_ptr, l2_ptr, bias_ptr, y_ptr, stride_tm, stride_l2r,
                    stride_l2n, stride_ym, HAS_LORA, L2_FP32, HAS_BIAS, R_PAD, INTERPRET)


@triton.jit
def _weight_only_kernel(
    x_ptr, smooth_ptr, qw_ptr, ws_ptr, wz_ptr, t_ptr, l2_ptr, bias_ptr, y_ptr,
    M, N, K, KP, R, OFFSET, W_GROUP, M_BUCKET,
    stride_xm, stride_wn, stride_wsn, stride_wsg, stride_wzn, stride_wzg,
    stride_tm, stride_l2r, stride_l2n, stride_ym,
    W_BITS: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZERO: tl.constexpr, W_GROUPED: tl.constexpr,
    X_FP32: tl.constexpr, HAS_LORA: tl.constexpr, L2_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y = (x / smooth) @ (s_w v)^T + t @ L2 + bias`` with float activations, packed weights."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=a_mask, other=0.0)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32)
            a = tl.div_rn(a.to(tl.float32), sm[None, :]).to(x_ptr.dtype.element_ty)
        g = k0 // W_GROUP
        v = _load_codes(qw_ptr, offs_n, k0, N, K, KP, stride_wn, W_BITS, BLOCK_N, BLOCK_K).to(tl.int32) - OFFSET
        if HAS_ZERO:
            v -= tl.load(wz_ptr + offs_n * stride_wzn + g * stride_wzg, mask=offs_n < N, other=0).to(tl.int32)[None, :]
        if INTERPRET:  # the interpreter cannot convert int32 to bfloat16 directly
            v = v.to(tl.float32)
        b = v.to(a.dtype)  # integers |v| <= 255: exact in fp16, bf16 and fp32
        if W_GROUPED:
            p = _fdot(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), X_FP32, INTERPRET)
            acc += p * _load_row_vector(ws_ptr, offs_n, g, N, stride_wsn, stride_wsg)[None, :]
        else:
            acc = _fdot(a, b, acc, X_FP32, INTERPRET)
    if not W_GROUPED:
        acc *= _load_row_vector(ws_ptr, offs_n, 0, N, stride_wsn, stride_wsg)[None, :]
    _epilogue_store(acc, offs_m, offs_n, M, N, R, t_ptr, l2_ptr, bias_ptr, y_ptr, stride_tm, stride_l2r,
                    stride_l2n, stride_ym, HAS_LORA, L2_FP32, HAS_BIAS, R_PAD, INTERPRET)


@triton.jit
def _patch_tile(x_ptr, smooth_ptr, offs_m, offs_k, M, K, H, W, HO, WO, TAPS, KW, SH, SW, PH, PW, DH, DW,
                stride_xn, stride_xc, stride_xh, stride_xw, HAS_SMOOTH: tl.constexpr):
    """A ``[BLOCK_M, BLOCK_K]`` tile of ``x``'s patches (im2col, never built): rows are output
    pixels ``(n, oh, ow)``, columns the weight's stored order ``channel * TAPS + tap``.

    Returns ``x`` (zeros outside the image) in its dtype, and ``smooth`` per column as float32
    (ones without smoothing).
    """
    n = offs_m // (HO * WO)
    pixel = offs_m % (HO * WO)
    ih0, iw0 = pixel // WO * SH - PH, pixel % WO * SW - PW  # the patch's top-left corner
    c, tap = offs_k // TAPS, offs_k % TAPS
    dh, dw = tap // KW * DH, tap % KW * DW
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    mask = inside & ((offs_m < M)[:, None] & (offs_k < K)[None, :])
    # Separable address: one per row (pixel) plus one per column (channel, tap), then a 2-D add.
    row = n * stride_xn + ih0 * stride_xh + iw0 * stride_xw
    col = c * stride_xc + dh * stride_xh + dw * stride_xw
    offs = row[:, None] + col[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + c, mask=offs_k < K, other=1.0).to(tl.float32)
    else:
        sm = tl.full([offs_k.shape[0]], 1.0, tl.float32)
    return x, sm


@triton.jit
def _conv_kernel(
    x_ptr, smooth_ptr, static_ptr, qw_ptr, ws_ptr, wz_ptr, t_ptr, l2_ptr, bias_ptr, y_ptr,
    M, N, K, KP, R, OFFSET, W_GROUP, SEG_COL, M_BUCKET,
    H, W, HO, WO, TAPS, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_wn, stride_wsn, stride_wsg, stride_wzn, stride_wzg,
    stride_tm, stride_l2r, stride_l2n, stride_ym,
    MODE: tl.constexpr, W_BITS: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_CORR: tl.constexpr, W_GROUPED: tl.constexpr, SEGMENTED: tl.constexpr, QMAX: tl.constexpr,
    FP32: tl.constexpr, HAS_LORA: tl.constexpr, L2_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Implicit-GEMM convolution ``y [pixels, out] = patches(x / smooth) @ W^T + t @ L2 + bias``.

    ``MODE`` 0: the patches are quantized as they are loaded, with the static scale of their
    channel segment (``static_ptr[0]`` before column ``SEG_COL``, ``static_ptr[1]`` from it on),
    and multiplied by the packed 4/8-bit codes as ``int8 x int8 -> int32``; 1 (weight-only): float
    patches times the codes' integer values, as ``_weight_only_kernel`` does.
    """
    CENTER: tl.constexpr = 8 if W_BITS == 4 else 128
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    rsum = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x, sm = _patch_tile(x_ptr, smooth_ptr, offs_m, offs_k, M, K, H, W, HO, WO, TAPS, KW, SH, SW, PH, PW, DH,
                            DW, stride_xn, stride_xc, stride_xh, stride_xw, HAS_SMOOTH)
        if MODE == 1:
            a = x
            if HAS_SMOOTH:
                a = tl.div_rn(x.to(tl.float32), sm[None, :]).to(x_ptr.dtype.element_ty)
            g = k0 // W_GROUP
            v = _load_codes(qw_ptr, offs_n, k0, N, K, KP, stride_wn, W_BITS, BLOCK_N, BLOCK_K).to(tl.int32) - OFFSET
            if HAS_ZERO:
                v -= tl.load(wz_ptr + offs_n * stride_wzn + g * stride_wzg, mask=offs_n < N, other=0).to(tl.int32)[None, :]
            if INTERPRET:  # the interpreter cannot convert int32 to bfloat16 directly
                v = v.to(tl.float32)
            b = v.to(a.dtype)  # integers |v| <= 255: exact in fp16, bf16 and fp32
            if W_GROUPED:
                p = _fdot(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32, INTERPRET)
                acc += p * _load_row_vector(ws_ptr, offs_n, g, N, stride_wsn, stride_wsg)[None, :]
            else:
                acc = _fdot(a, b, acc, FP32, INTERPRET)
        else:
            s_a = tl.load(static_ptr + (k0 >= SEG_COL).to(tl.int32)).to(tl.float32)
            v = _round_half_even(tl.div_rn(tl.div_rn(x.to(tl.float32), sm[None, :]), s_a))
            a = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0).to(tl.int8)
            codes = _load_codes(qw_ptr, offs_n, k0, N, K, KP, stride_wn, W_BITS, BLOCK_N, BLOCK_K)
            if W_BITS == 4:
                b = codes.to(tl.int8) - CENTER
            else:
                b = (codes ^ 0x80).to(tl.int8, bitcast=True)  # code - 128
            if W_GROUPED or SEGMENTED:  # BLOCK_K divides the weight groups and the segments
                p = tl.dot(a, b, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32))
                if HAS_CORR:
                    c = _code_correction(wz_ptr, offs_n, k0 // W_GROUP, N, OFFSET, stride_wzn, stride_wzg,
                                         HAS_ZERO, CENTER, BLOCK_N)
                    p += tl.sum(a.to(tl.int32), axis=1)[:, None] * c[None, :]
                pf = p.to(tl.float32)
                if W_GROUPED:
                    pf *= _load_row_vector(ws_ptr, offs_n, k0 // W_GROUP, N, stride_wsn, stride_wsg)[None, :]
                acc += pf * s_a
            else:
                acc_i = tl.dot(a, b, acc_i)
                if HAS_CORR:
                    rsum += tl.sum(a.to(tl.int32), axis=1)
    if MODE == 0 and not (W_GROUPED or SEGMENTED):
        if HAS_CORR:
            c = _code_correction(wz_ptr, offs_n, 0, N, OFFSET, stride_wzn, stride_wzg, HAS_ZERO, CENTER, BLOCK_N)
            acc_i += rsum[:, None] * c[None, :]
        acc = acc_i.to(tl.float32) * tl.load(static_ptr).to(tl.float32)
    if not W_GROUPED:
        acc *= _load_row_vector(ws_ptr, offs_n, 0, N, stride_wsn, stride_wsg)[None, :]
    _epilogue_store(acc, offs_m, offs_n, M, N, R, t_ptr, l2_ptr, bias_ptr, y_ptr, stride_tm, stride_l2r,
                    stride_l2n, stride_ym, HAS_LORA, L2_FP32, HAS_BIAS, R_PAD, INTERPRET)


@triton.jit
def _conv_lowrank_kernel(
    x_ptr, smooth_ptr, l1_ptr, t_ptr, M, R, K,
    H, W, HO, WO, TAPS, KW, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_l1k, stride_l1r, stride_tm,
    HAS_SMOOTH: tl.constexpr, L1_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``t = patches(x / smooth) @ L1`` in float32: a convolution's low-rank down-projection (a
    ``kh x kw`` convolution to ``R`` channels), with ``x / smooth`` rounded to ``L1``'s dtype."""
    pid_m, pid_n = _tile_ids(M, R, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x, sm = _patch_tile(x_ptr, smooth_ptr, offs_m, offs_k, M, K, H, W, HO, WO, TAPS, KW, SH, SW, PH, PW, DH,
                            DW, stride_xn, stride_xc, stride_xh, stride_xw, HAS_SMOOTH)
        l1_mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
        l1 = tl.load(l1_ptr + offs_k[:, None] * stride_l1k + offs_r[None, :] * stride_l1r, mask=l1_mask, other=0.0)
        t = _fdot(tl.div_rn(x.to(tl.float32), sm[None, :]).to(l1.dtype), l1, t, L1_FP32, INTERPRET)
    mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], t, mask=mask)


# --------------------------------------------------------------------------- launch configuration


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one GEMM launch."""

    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 3
    group_m: int = 8


def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing ``n``."""
    return n & -n


def _gemm_blocks(M: int, K: int, seg: int, int_path: bool, fp32: bool = False,
                 narrow_n: bool = False) -> Blocks:
    """Tiles for a GEMM whose K tiles must not straddle a scale segment of ``seg`` columns.

    GPU sizes are starting points chosen without a GPU to tune on. ``narrow_n`` asks for
    ``BLOCK_N=64`` where 128 x 128 tiles spill registers (see :func:`_narrow_n`).
    """
    k_cap = 64 if INTERPRET or not int_path else 128
    if fp32 and not INTERPRET:  # IEEE fp32 products run on FMA units: small tiles, little shared memory
        k_cap = 32
    block_k = k_cap if seg == K else min(k_cap, _pow2_divisor(seg))
    if INTERPRET:
        return Blocks(32, 64, block_k, stages=1)
    if fp32:
        return Blocks(64, 64, block_k, warps=4, stages=2)
    block_m = 128 if M > 64 else max(16, triton.next_power_of_2(M))
    warps = 8 if block_m == 128 else 4
    block_n = 64 if narrow_n else 128
    return Blocks(block_m, block_n, block_k, warps=warps, stages=4 if block_k <= 64 else 3)


def _conv_blocks(M: int, K: int, seg: int, int_path: bool, fp32: bool) -> Blocks:
    """Tiles of the implicit-GEMM convolution: :func:`_gemm_blocks`' with 64-column, 64-deep tiles.

    Gathering a patch tile costs registers a GEMM's activation tile does not (a row and a
    column address, the image-edge masks): at 128 x 128 (or 128-deep) tiles every variant
    spilled on some target (up to 328 B of stack on sm_90); ``tests/test_kernels_compiled.py``
    compiles these for SDXL's convolutions.
    """
    b = _gemm_blocks(M, K, seg, int_path, fp32=fp32, narrow_n=True)
    return b if INTERPRET or fp32 else Blocks(b.m, b.n, min(b.k, 32), b.warps, 3)


def _narrow_n(zero_tiles: bool, rank: int, *, capability: int, weight_only: bool = False) -> bool:
    """Whether a GEMM takes 64-column tiles on ``sm_<capability>``: measured with
    ``tests/test_kernels_compiled.py``, at 128 x 128 the integer GEMM spilled where it corrects
    each K tile for zero points (group-wise scales with zero points: 255 registers, 208 B stack,
    52 STL / 51 LDL on sm_90), GEMMs with a low-rank branch of rank > 64 spilled on sm_80 (rank
    256: 72 B stack, 14 STL / 25 LDL W4A4, 56 B W4A16; rank 128 W8A8: 32 B), and the weight-only
    GEMM spilled on consumer Blackwell (sm_120: 255 registers, 16 B stack, 3 STL / 3 LDL)."""
    return zero_tiles or rank > 64 or (weight_only and _consumer_blackwell(capability))


def _consumer_blackwell(capability: int) -> bool:
    """``sm_12x`` (RTX 50 series): 64K registers and 99 KiB of shared memory per block, where some
    of the data-centre tiles spill."""
    return capability // 10 == 12


def device_capability(device: torch.device) -> int:
    """``sm_<major><minor>`` of a CUDA device as one number (``90`` for an H100), ``0`` for any other
    device (the interpreter's tiles do not depend on it); the tile choices that depend on the
    target read it here, and the static check (:mod:`diffq.kernels.compiled`) sets it per target."""
    if device.type != "cuda":
        return 0
    return _cuda_capability(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_capability(index: int) -> int:
    """Read once per device: every launch asks."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _act_blocks(K: int, a_group: int | None, rank: int = 0) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_K)`` of the activation kernel (``BLOCK_K`` is the group when grouped).

    Otherwise a K tile of ``L1`` holds at most 4096 elements (``BLOCK_K x R_PAD``): at
    ``BLOCK_K=256`` a rank-32 branch spilled registers (255 registers, 232 B of stack on sm_90,
    static or dynamic scales) and rank 256 asked for 274 KiB of shared memory;
    ``tests/test_kernels_compiled.py`` compiles these for sm_80/sm_90 and checks.
    """
    if a_group is not None:
        return 16, a_group
    if INTERPRET:
        return 16, 64
    return 16, max(32, min(256, 4096 // _rank_pad(rank)))


# --------------------------------------------------------------------------- routing


def _activation_group(K: int, act_bits: int | None, act_scale: torch.Tensor | None,
                      act_group_size: int | None) -> int | None:
    """The activation group size the reference uses (``None``: one scale per token or static)."""
    if act_bits is None or act_scale is not None or act_group_size is None:
        return None
    return act_group_size if K % act_group_size == 0 and act_group_size < K else None


def _segment(K: int, w_group: int | None, a_group: int | None) -> int:
    """Columns over which both the weight and the activation scale are constant."""
    return math.gcd(w_group or K, a_group or K)


def unsupported_reason(
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
) -> str | None:
    """Why this call goes to the reference instead of Triton (``None``: Triton runs it)."""
    K = in_features
    reason = _input_reason(x)
    if reason is None and (x.numel() == 0 or x.shape[-1] != K):
        reason = "empty input or feature count mismatch"
    return reason or _operands_reason(
        qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, K=K, act_bits=act_bits,
        act_scale=act_scale, a_group=_activation_group(K, act_bits, act_scale, act_group_size),
        lowrank_down=lowrank_down, lowrank_up=lowrank_up,
    )


def _input_reason(x: torch.Tensor) -> str | None:
    """Why ``x``'s device or dtype keeps a call off Triton."""
    if x.device.type != "cuda" and not INTERPRET:
        return f"tensors on {x.device.type}, Triton runs on CUDA"
    if x.dtype not in _FLOATS:
        return f"activations in {x.dtype}"
    return None


def _operands_reason(
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    *,
    w_bits: int,
    w_code_offset: int,
    K: int,
    act_bits: int | None,
    act_scale: torch.Tensor | None,
    a_group: int | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
) -> str | None:
    """Why the weights, scales or factors of a GEMM with ``K`` columns keep it off Triton."""
    if w_bits not in (4, 8):
        return f"{w_bits}-bit weights (Triton handles 4 and 8)"
    if w_code_offset not in (0, 2 ** (w_bits - 1)):
        return f"code offset {w_code_offset}"
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != packed_cols(K, w_bits):
        return "qweight is not packed uint8 [out, packed in]"
    N = qweight.shape[0]
    if w_scale.dim() != 2 or w_scale.shape[0] not in (1, N) or K % w_scale.shape[1] != 0:
        return "weight scales are not [out or 1, blocks dividing in_features]"
    if w_scale.dtype not in _FLOATS:
        return f"weight scales in {w_scale.dtype}"
    if w_zero is not None and (w_zero.shape != w_scale.shape or w_zero.dtype != torch.uint8):
        return "zero points are not uint8 shaped like the scales"
    if act_bits is not None and not 2 <= act_bits <= 8:
        return f"{act_bits}-bit activations (int8 storage holds 2..8 bits)"
    if act_bits is not None and K > _MAX_INT_K:
        return f"in_features {K} > {_MAX_INT_K} could overflow the int32 accumulator"
    if act_scale is not None and act_bits is not None and act_scale.numel() != 1:
        return "static activation scale is not a scalar"
    if a_group is not None and (a_group < 32 or a_group & (a_group - 1) or a_group > 1024):
        return f"activation group {a_group} (Triton needs a power of two in 32..1024)"
    w_group = K // w_scale.shape[1] if w_scale.shape[1] > 1 else None
    seg = _segment(K, w_group, a_group)
    min_tile = 16 if act_bits is None else 32  # int8 tensor-core instructions take K = 32
    if seg != K and _pow2_divisor(seg) < min_tile:
        return f"scale groups of {seg} columns (Triton needs K tiles of at least {min_tile})"
    if lowrank_down is not None and lowrank_up is not None:
        if lowrank_down.dtype not in _FLOATS or lowrank_up.dtype not in _FLOATS:
            return "low-rank factors are not float16/bfloat16/float32"
        if lowrank_down.shape[0] != K or lowrank_up.shape != (lowrank_down.shape[1], N) or lowrank_down.shape[1] > _MAX_RANK:
            return f"low-rank factors are not [in, r] and [r, out] with r <= {_MAX_RANK}"
    return None


def quantized_linear_triton(
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
    """:func:`reference.quantized_linear` on Triton kernels; unsupported calls run the reference."""
    kwargs = dict(w_bits=w_bits, w_code_offset=w_code_offset, in_features=in_features, bias=bias,
                  act_bits=act_bits, act_scale=act_scale, act_group_size=act_group_size, smooth=smooth,
                  lowrank_down=lowrank_down, lowrank_up=lowrank_up)
    if unsupported_reason(x, qweight, w_scale, w_zero, **kwargs) is not None:
        return reference.quantized_linear(x, qweight, w_scale, w_zero, **kwargs)
    shape = x.shape
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if lowrank_down is None or lowrank_up is None or lowrank_down.shape[1] == 0:
        lowrank_down = lowrank_up = None
    # The kernels index these along their last dimension with stride 1 (no-ops for module buffers).
    qweight = qweight.contiguous()
    smooth = None if smooth is None else smooth.contiguous()
    bias = None if bias is None else bias.contiguous()
    a_group = _activation_group(in_features, act_bits, act_scale, act_group_size)
    weights = (qweight, w_scale, w_zero, w_bits, w_code_offset)
    if act_bits is None:
        t = None if lowrank_down is None else act_quant_lowrank(x2, None, smooth=smooth, lowrank_down=lowrank_down)[2]
        y = weight_only_gemm(x2, *weights, smooth=smooth, t=t, lowrank_up=lowrank_up, bias=bias)
    else:
        q, s, t = act_quant_lowrank(x2, act_bits, act_scale=act_scale, group_size=a_group, smooth=smooth,
                                    lowrank_down=lowrank_down)
        y = int_gemm(q, s, *weights, a_group=a_group, t=t, lowrank_up=lowrank_up, bias=bias, out_dtype=x.dtype)
    return y.reshape(*shape[:-1], qweight.shape[0])


def _conv_as_linear_reason(x: torch.Tensor, weight_shape: tuple[int, int, int, int],
                           padding: tuple[int, int] | str, groups: int, act_bits: int | None,
                           act_scale: torch.Tensor | None, act_segments: tuple[int, ...]) -> str | None:
    """Why a convolution is not a linear layer over pixels (``None``: it is)."""
    if x.dim() != 4:
        return "input is not [N, C, H, W]"
    if tuple(weight_shape[2:]) != (1, 1):
        return f"{weight_shape[2]}x{weight_shape[3]} kernel (Triton runs 1x1 convolutions)"
    if groups != 1:
        return f"groups={groups}"
    if padding not in ("valid", "same") and tuple(padding) != (0, 0):
        return f"padding {padding} of a 1x1 convolution"
    if act_bits is not None and act_segments:
        return "activations quantized per channel segment (a concatenated input)"
    if act_bits is not None and act_scale is not None and act_scale.numel() != 1:
        return "more than one static activation scale"
    return None


def _pixels(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``x [N, C, H, W]`` sampled with ``stride`` as tokens ``[N, H', W', C]`` (a view for channels-last ``x``)."""
    return x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1)


def conv2d_unsupported_reason(
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
) -> str | None:
    """Why this convolution runs the reference instead of Triton (``None``: Triton runs it).

    Unpadded 1x1 convolutions run the linear kernels (any activation scheme; ``dilation`` does not
    matter, a stride samples the input first); every other one the implicit-GEMM kernel, for
    weight-only layers, static activation scales and dynamic ones (:func:`_implicit_gemm_reason`).
    """
    kwargs = dict(w_bits=w_bits, w_code_offset=w_code_offset, weight_shape=weight_shape, stride=stride,
                  padding=padding, dilation=dilation, groups=groups, bias=bias, act_bits=act_bits,
                  act_scale=act_scale, act_segments=act_segments, act_group_size=act_group_size, smooth=smooth,
                  lowrank_down=lowrank_down, lowrank_up=lowrank_up)
    if _conv_as_linear_reason(x, weight_shape, padding, groups, act_bits, act_scale, act_segments) is None:
        return unsupported_reason(
            _pixels(x, stride), qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset,
            in_features=weight_shape[1], bias=bias, act_bits=act_bits, act_scale=act_scale,
            act_group_size=act_group_size, smooth=smooth, lowrank_down=lowrank_down, lowrank_up=lowrank_up,
        )
    return _implicit_gemm_reason(x, qweight, w_scale, w_zero, **kwargs)


def _conv_padding(padding: tuple[int, int] | str, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of zeros before the image (``'same'``: PyTorch's split, the odd one after)."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    return int(padding[0]), int(padding[1])


def _conv_output(x: torch.Tensor, weight_shape: tuple[int, int, int, int], stride: tuple[int, int],
                 padding: tuple[int, int] | str, dilation: tuple[int, int]) -> tuple[int, int]:
    """``(H_out, W_out)`` of the convolution, as ``F.conv2d`` computes them."""
    if padding == "same":
        return x.shape[2], x.shape[3]
    pads = _conv_padding(padding, weight_shape[2:], dilation)
    return tuple((x.shape[2 + i] + 2 * pads[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in (0, 1))


def _conv_segment(K: int, taps: int, w_scale: torch.Tensor, act_segments: tuple[int, ...]) -> int:
    """Columns over which the weight scale and the activation segment are both constant."""
    w_group = K // w_scale.shape[1] if w_scale.shape[1] > 1 else K
    return math.gcd(K, w_group, act_segments[0] * taps if act_segments else K)


def _implicit_gemm_reason(
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
    bias: torch.Tensor | None,
    act_bits: int | None,
    act_scale: torch.Tensor | None,
    act_segments: tuple[int, ...],
    act_group_size: int | None,
    smooth: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
) -> str | None:
    """Why :func:`implicit_gemm_conv2d` cannot run this convolution (``None``: it can)."""
    out, channels, kh, kw = weight_shape
    if x.dim() != 4 or x.shape[1] != channels * groups:
        return "input is not [N, C, H, W] with the weight's channels"
    reason = _input_reason(x)
    if reason is not None:
        return reason
    if groups != 1:
        return f"groups={groups}"
    dynamic = act_bits is not None and act_scale is None
    if dynamic:
        reason = _dynamic_pixels_reason(channels, act_bits, act_segments, act_group_size)
        if reason is not None:
            return reason
    elif len(act_segments) > 1 or (act_bits is not None and act_scale.numel() != len(act_segments) + 1):
        return "activation segments other than one split with a static scale each"
    if isinstance(padding, str) and (padding not in ("same", "valid") or (padding == "same" and tuple(stride) != (1, 1))):
        return f"padding {padding!r} with stride {stride}"
    if min(_conv_output(x, weight_shape, stride, padding, dilation)) <= 0 or x.numel() == 0:
        return "empty input or output"
    K = channels * kh * kw
    gemm_act_bits = None if dynamic else act_bits  # dynamic: a 16-bit GEMM of the fake-quantized input
    reason = _operands_reason(qweight, w_scale, w_zero, w_bits=w_bits, w_code_offset=w_code_offset, K=K,
                              act_bits=gemm_act_bits, act_scale=None, a_group=None, lowrank_down=lowrank_down,
                              lowrank_up=lowrank_up)
    if reason is not None:
        return reason
    seg = _conv_segment(K, kh * kw, w_scale, () if dynamic else act_segments)
    min_tile = 16 if gemm_act_bits is None else 32
    if seg != K and _pow2_divisor(seg) < min_tile:
        return f"scale groups or segments of {seg} columns (Triton needs K tiles of at least {min_tile})"
    if smooth is not None and smooth.numel() != channels:
        return "smoothing vector is not one value per input channel"
    if bias is not None and bias.numel() != out:
        return "bias is not one value per output channel"
    return None


def _dynamic_pixels_reason(channels: int, act_bits: int, act_segments: tuple[int, ...],
                           act_group_size: int | None) -> str | None:
    """Why :func:`fake_quantize_pixels` cannot quantize a convolution's input (``None``: it can)."""
    if not 2 <= act_bits <= 8:
        return f"{act_bits}-bit activations (Triton quantizes 2..8 bits)"
    bounds = [0, *act_segments, channels]
    if any(lo >= hi for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)):
        return f"activation segments {act_segments} are not increasing channel indices inside 0..{channels}"
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        group = _activation_group(hi - lo, act_bits, None, act_group_size)
        if group is not None and (group < 32 or group & (group - 1) or group > 1024):
            return f"activation group {group} (Triton needs a power of two in 32..1024)"
    return None


def quantized_conv2d_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """:func:`reference.quantized_conv2d` on Triton: unpadded 1x1 convolutions on the linear
    kernels (the pixels are tokens, ``[N, C, H, W] -> [N H W, C]``), other ones on the
    implicit-GEMM kernel; the result is ``[N, out, H', W']``, contiguous.

    Calls neither can serve (:func:`conv2d_unsupported_reason`) run the reference. ``kwargs`` are
    the reference's keyword arguments.
    """
    if conv2d_unsupported_reason(x, qweight, w_scale, w_zero, **kwargs) is not None:
        return reference.quantized_conv2d(x, qweight, w_scale, w_zero, **kwargs)
    act_scale = kwargs.get("act_scale")
    if _conv_as_linear_reason(x, kwargs["weight_shape"], kwargs["padding"], kwargs["groups"], kwargs.get("act_bits"),
                              act_scale, kwargs.get("act_segments", ())) is not None:
        return implicit_gemm_conv2d(x, qweight, w_scale, w_zero, **kwargs)
    tokens = _pixels(x, kwargs["stride"]).contiguous()
    y = quantized_linear_triton(
        tokens, qweight, w_scale, w_zero, w_bits=kwargs["w_bits"], w_code_offset=kwargs["w_code_offset"],
        in_features=kwargs["weight_shape"][1], bias=kwargs.get("bias"), act_bits=kwargs.get("act_bits"),
        act_scale=None if act_scale is None else act_scale.reshape(()),
        act_group_size=kwargs.get("act_group_size"), smooth=kwargs.get("smooth"),
        lowrank_down=kwargs.get("lowrank_down"), lowrank_up=kwargs.get("lowrank_up"),
    )
    return y.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- launchers


def _rank_pad(rank: int) -> int:
    """The rank padded to a ``tl.dot`` dimension (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _scale_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """Strides of a ``[rows or 1, blocks]`` tensor, with a stride of 0 over a single row."""
    if t is None:
        return 0, 0
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def act_quant_lowrank(
    x2: torch.Tensor,
    act_bits: int | None,
    *,
    act_scale: torch.Tensor | None = None,
    group_size: int | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One activation pass over ``x2 [M, K]``: ``(q int8, scales fp32, (x / smooth) @ L1 fp32)``.

    ``q`` and the scales are ``None`` when ``act_bits`` is ``None``; the scales are ``[M, K //
    group_size]`` (dynamic), or ``act_scale`` as a 1-element float32 tensor (static); the
    low-rank product is ``None`` without ``lowrank_down``. ``group_size`` is taken as given (see
    :func:`_activation_group` for the reference's rule).
    """
    M, K = x2.shape
    dev = x2.device
    quant = act_bits is not None
    static = quant and act_scale is not None
    q = torch.empty((M, K), dtype=torch.int8, device=dev) if quant else None
    if static:
        s = act_scale.reshape(1).to(device=dev, dtype=torch.float32)
    elif quant:
        s = torch.empty((M, K // group_size if group_size else 1), dtype=torch.float32, device=dev)
    else:
        s = None
    r = 0 if lowrank_down is None else lowrank_down.shape[1]
    t = torch.empty((M, r), dtype=torch.float32, device=dev) if r else None
    if not quant and not r:
        return None, None, None
    block_m, block_k = _act_blocks(K, group_size if quant and not static else None, r)
    dummy = x2
    _act_kernel[(triton.cdiv(M, block_m),)](
        x2, dummy if smooth is None else smooth, dummy if lowrank_down is None else lowrank_down,
        s if static else dummy, dummy if q is None else q, s if quant and not static else dummy,
        dummy if t is None else t,
        M, K, r, x2.stride(0), lowrank_down.stride(0) if r else 0, lowrank_down.stride(1) if r else 0,
        K, s.stride(0) if quant and not static else 0, r,
        HAS_SMOOTH=smooth is not None, HAS_LORA=r > 0,
        L1_FP32=r > 0 and lowrank_down.dtype == torch.float32, QUANT=quant, STATIC=static,
        A_GROUPED=quant and not static and group_size is not None,
        QMAX=2 ** (act_bits - 1) - 1 if quant else 1, FAKE=False,
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=_rank_pad(r), INTERPRET=INTERPRET,
        num_warps=4,
    )
    return q, s, t


def fake_quantize_pixels(
    x: torch.Tensor,
    act_bits: int,
    *,
    act_group_size: int | None = None,
    act_segments: tuple[int, ...] = (),
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [N, C, H, W] / smooth`` fake-quantized with dynamic scales per pixel (and
    ``act_group_size`` channels) in each channel segment, as :func:`reference.quantized_conv2d`
    quantizes a convolution's input, then rounded to ``x``'s dtype; returned channels-last.

    One ``_act_kernel`` pass per segment over the pixels as rows: the codes and scales are the
    reference's bit for bit, their float32 products are rounded to ``x``'s dtype once (exact for
    float32).
    """
    n, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view for channels-last x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows, memory_format=torch.contiguous_format)
    smooth = None if smooth is None else smooth.contiguous()
    bounds = [0, *act_segments, channels]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        group = _activation_group(hi - lo, act_bits, None, act_group_size)
        scales = torch.empty((rows.shape[0], (hi - lo) // group if group else 1), dtype=torch.float32,
                             device=x.device)
        block_m, block_k = _act_blocks(hi - lo, group)
        _act_kernel[(triton.cdiv(rows.shape[0], block_m),)](
            rows[:, lo:hi], out if smooth is None else smooth[lo:hi], out, out, out[:, lo:hi], scales, out,
            rows.shape[0], hi - lo, 0, rows.stride(0), 0, 0, out.stride(0), scales.stride(0), 0,
            HAS_SMOOTH=smooth is not None, HAS_LORA=False, L1_FP32=False, QUANT=True, STATIC=False,
            A_GROUPED=group is not None, QMAX=2 ** (act_bits - 1) - 1, FAKE=True,
            BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=_rank_pad(0), INTERPRET=INTERPRET, num_warps=4,
        )
    return out.view(n, height, width, channels).permute(0, 3, 1, 2)


def _epilogue_args(t: torch.Tensor | None, lowrank_up: torch.Tensor | None, bias: torch.Tensor | None,
                   dummy: torch.Tensor) -> tuple[list, dict]:
    """Pointer/stride arguments and constexprs shared by both GEMMs' epilogues."""
    has_lowrank = t is not None and lowrank_up is not None
    ptrs = [t if has_lowrank else dummy, lowrank_up if has_lowrank else dummy, dummy if bias is None else bias]
    strides = [t.stride(0) if has_lowrank else 0, lowrank_up.stride(0) if has_lowrank else 0,
               lowrank_up.stride(1) if has_lowrank else 0]
    flags = dict(HAS_LORA=has_lowrank, L2_FP32=has_lowrank and lowrank_up.dtype == torch.float32,
                 HAS_BIAS=bias is not None, R_PAD=_rank_pad(t.shape[1] if has_lowrank else 0))
    return [ptrs, strides], flags


def int_gemm(
    q: torch.Tensor,
    s: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_bits: int,
    w_code_offset: int,
    *,
    a_group: int | None = None,
    t: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``(q * s) @ W^T + t @ lowrank_up + bias`` with int8 ``q [M, K]`` and packed 4/8-bit ``W``.

    ``s`` is ``[M, K // a_group]`` (``a_group=None``: ``[M, 1]``) or a 1-element static scale.
    """
    M, K = q.shape
    N = qweight.shape[0]
    w_group = K // w_scale.shape[1] if w_scale.shape[1] > 1 else None
    seg = _segment(K, w_group, a_group)
    rank = 0 if t is None else t.shape[1]
    tuned = blocks is None and _autotuning(q)
    blocks = blocks or _gemm_blocks(M, K, seg, int_path=True, narrow_n=_narrow_n(
        seg != K and w_zero is not None, rank, capability=device_capability(q.device)))
    y = torch.empty((M, N), dtype=out_dtype, device=q.device)
    s_strides = (0, 0) if s.dim() == 1 else (s.stride(0), s.stride(1))  # 1-D: a static scale
    (ptrs, lstrides), flags = _epilogue_args(t, lowrank_up, bias, y)
    args = (
        q, s, qweight, w_scale, y if w_zero is None else w_zero, *ptrs, y,
        M, N, K, qweight.shape[1], 0 if t is None else t.shape[1], w_code_offset, w_group or K, a_group or K,
        _m_bucket(M), q.stride(0), *s_strides, qweight.stride(0), *_scale_strides(w_scale),
        *_scale_strides(w_zero), *lstrides, y.stride(0),
    )
    flags.update(W_BITS=w_bits, HAS_ZERO=w_zero is not None,
                 HAS_CORR=w_zero is not None or w_code_offset != 2 ** (w_bits - 1),
                 W_GROUPED=w_group is not None, A_GROUPED=a_group is not None, INTERPRET=INTERPRET)
    _launch("int", _int_gemm_kernel, tuned, blocks, M, N, args, flags, q.device)
    return y


def weight_only_gemm(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    w_bits: int,
    w_code_offset: int,
    *,
    smooth: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``(x2 / smooth) @ W^T + t @ lowrank_up + bias`` with float ``x2 [M, K]`` and packed ``W``."""
    M, K = x2.shape
    N = qweight.shape[0]
    w_group = K // w_scale.shape[1] if w_scale.shape[1] > 1 else None
    rank = 0 if t is None else t.shape[1]
    fp32 = x2.dtype == torch.float32
    tuned = blocks is None and not fp32 and _autotuning(x2)  # fp32 (FMA units) keeps its small tiles
    blocks = blocks or _gemm_blocks(M, K, w_group or K, int_path=False, fp32=fp32, narrow_n=_narrow_n(
        False, rank, weight_only=True, capability=device_capability(x2.device)))
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    (ptrs, lstrides), flags = _epilogue_args(t, lowrank_up, bias, y)
    args = (
        x2, y if smooth is None else smooth, qweight, w_scale, y if w_zero is None else w_zero, *ptrs, y,
        M, N, K, qweight.shape[1], 0 if t is None else t.shape[1], w_code_offset, w_group or K, _m_bucket(M),
        x2.stride(0), qweight.stride(0), *_scale_strides(w_scale), *_scale_strides(w_zero),
        *lstrides, y.stride(0),
    )
    flags.update(W_BITS=w_bits, HAS_SMOOTH=smooth is not None, HAS_ZERO=w_zero is not None,
                 W_GROUPED=w_group is not None, X_FP32=fp32, INTERPRET=INTERPRET)
    _launch("weight_only", _weight_only_kernel, tuned, blocks, M, N, args, flags, x2.device)
    return y


def implicit_gemm_conv2d(
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
    groups: int = 1,
    bias: torch.Tensor | None = None,
    act_bits: int | None = None,
    act_scale: torch.Tensor | None = None,
    act_segments: tuple[int, ...] = (),
    act_group_size: int | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """:func:`reference.quantized_conv2d` as an implicit GEMM: the kernels read each patch tile
    from ``x`` (any strides, so channels-last too) and never build the im2col matrix.

    With static activation scales ``_conv_kernel`` quantizes the patches as it loads them and
    multiplies them by the int8 weight codes; weight-only layers multiply the float patches by the
    codes' values. With dynamic scales (per pixel, so a patch's values have different ones and no
    integer sum can be scaled once) :func:`fake_quantize_pixels` quantizes ``x`` first and the
    weight-only GEMM multiplies its fake-quantized patches, in ``x``'s dtype, by the codes' values.
    A low-rank branch's down-projection (a ``kh x kw`` convolution to ``r``
    channels) runs first (``_conv_lowrank_kernel``); the GEMM's epilogue adds its up-projection
    and the bias. On CUDA the GEMM autotunes over ``CONV_CONFIGS`` (:func:`prune_conv_configs`),
    elsewhere it runs :func:`_conv_blocks`' tiles; :func:`_implicit_gemm_reason` says what this accepts.
    """
    n_images, channels, height, width = x.shape
    out, _, kh, kw = weight_shape
    taps = kh * kw
    K = channels * taps
    ho, wo = _conv_output(x, weight_shape, stride, padding, dilation)
    M = n_images * ho * wo
    shape = (height, width, ho, wo, taps, kw, *stride, *_conv_padding(padding, (kh, kw), dilation), *dilation)
    smooth = None if smooth is None else smooth.contiguous()
    t = None
    if lowrank_down is not None and lowrank_up is not None and lowrank_down.shape[1]:
        t = _conv_lowrank(x, smooth, lowrank_down, M, K, (*shape, *x.stride()))
    patches, patch_smooth = x, smooth
    if act_bits is not None and act_scale is None:  # the 16-bit GEMM of the fake-quantized input
        patches = fake_quantize_pixels(x, act_bits, act_group_size=act_group_size, act_segments=act_segments,
                                       smooth=smooth)
        patch_smooth, act_bits, act_segments = None, None, ()
    int_path = act_bits is not None
    seg = _conv_segment(K, taps, w_scale, act_segments)
    w_group = K // w_scale.shape[1] if w_scale.shape[1] > 1 else None
    fp32 = x.dtype == torch.float32 and not int_path
    rank = 0 if t is None else t.shape[1]
    tuned = blocks is None and not fp32 and _autotuning(x)  # fp32 (FMA units) keeps its small tiles
    blocks = blocks or _conv_blocks(M, K, seg, int_path, fp32)
    qweight = qweight.contiguous()
    y = torch.empty((M, out), dtype=x.dtype, device=x.device)
    (ptrs, lstrides), flags = _epilogue_args(t, lowrank_up, None if bias is None else bias.contiguous(), y)
    static = act_scale.reshape(-1).to(device=x.device, dtype=torch.float32) if int_path else y
    seg_col = act_segments[0] * taps if int_path and act_segments else K
    args = (
        patches, y if patch_smooth is None else patch_smooth, static, qweight, w_scale,
        y if w_zero is None else w_zero, *ptrs, y,
        M, out, K, qweight.shape[1], rank, w_code_offset, w_group or K, seg_col, _m_bucket(M), *shape,
        *patches.stride(), qweight.stride(0), *_scale_strides(w_scale), *_scale_strides(w_zero), *lstrides,
        y.stride(0),
    )
    flags.update(MODE=0 if int_path else 1, W_BITS=w_bits, HAS_SMOOTH=patch_smooth is not None,
                 HAS_ZERO=w_zero is not None,
                 HAS_CORR=int_path and (w_zero is not None or w_code_offset != 2 ** (w_bits - 1)),
                 W_GROUPED=w_group is not None, SEGMENTED=int_path and bool(act_segments),
                 QMAX=2 ** (act_bits - 1) - 1 if int_path else 1, FP32=fp32, INTERPRET=INTERPRET)
    _launch("conv", _conv_kernel, tuned, blocks, M, out, args, flags, x.device)
    return y.view(n_images, ho, wo, out).permute(0, 3, 1, 2).contiguous()


def _conv_lowrank(x: torch.Tensor, smooth: torch.Tensor | None, lowrank_down: torch.Tensor, M: int, K: int,
                  geometry: tuple) -> torch.Tensor:
    """``patches(x / smooth) @ lowrank_down`` as float32 ``[M, r]`` (``_conv_lowrank_kernel``)."""
    rank = lowrank_down.shape[1]
    t = torch.empty((M, rank), dtype=torch.float32, device=x.device)
    fp32 = lowrank_down.dtype == torch.float32
    b = _gemm_blocks(M, K, K, int_path=False, fp32=fp32)
    block_n = min(b.n, _rank_pad(rank))
    _conv_lowrank_kernel[(triton.cdiv(M, b.m) * triton.cdiv(rank, block_n),)](
        x, t if smooth is None else smooth, lowrank_down, t, M, rank, K, *geometry,
        lowrank_down.stride(0), lowrank_down.stride(1), t.stride(0),
        HAS_SMOOTH=smooth is not None, L1_FP32=fp32, BLOCK_M=b.m, BLOCK_N=block_n, BLOCK_K=b.k,
        GROUP_M=b.group_m, INTERPRET=INTERPRET, num_warps=b.warps, num_stages=b.stages,
    )
    return t


def _launch(kind: str, kernel, tuned: bool, blocks: Blocks, M: int, N: int, args: tuple, flags: dict,
            device: torch.device) -> None:
    """Launch a GEMM with ``blocks``, or through its autotuner (``tuned``: CUDA only)."""
    if not tuned:
        grid = (triton.cdiv(M, blocks.m) * triton.cdiv(N, blocks.n),)
        kernel[grid](*args, **flags, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, GROUP_M=blocks.group_m,
                     num_warps=blocks.warps, num_stages=blocks.stages)
        return
    tuner = _tuner(kind, kernel)
    name = _load_winners(kind, tuner, device)
    known = len(tuner.cache)
    tuner[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    if len(tuner.cache) > known:
        _save_winners(kind, tuner, name)


# --------------------------------------------------------------------------- autotuning (CUDA only)

# Candidate tiles per GEMM (``Blocks(m, n, k, warps, stages)``); the pruner keeps those that suit
# the call, and where none does the fixed choice of :func:`_gemm_blocks` runs. Every candidate the
# pruner keeps at SDXL shapes is compiled for sm_90 by tests/test_kernels_compiled.py (no spills).
# The winners are kept per GPU name in :func:`winners_path`.
INT_CONFIGS = [
    Blocks(128, 128, 128, 8, 3), Blocks(128, 128, 64, 8, 4), Blocks(128, 64, 64, 8, 4),
    Blocks(64, 128, 128, 4, 4), Blocks(64, 64, 128, 4, 4), Blocks(32, 128, 128, 4, 4),
    Blocks(16, 128, 128, 4, 4), Blocks(16, 64, 128, 4, 5),
]
WEIGHT_ONLY_CONFIGS = [
    Blocks(128, 128, 64, 8, 4), Blocks(128, 64, 64, 8, 4), Blocks(128, 64, 64, 4, 4), Blocks(64, 128, 64, 4, 4),
    Blocks(64, 64, 64, 4, 4), Blocks(32, 128, 64, 4, 4), Blocks(16, 128, 64, 4, 4), Blocks(16, 64, 64, 4, 5),
]
# The implicit-GEMM convolution's: 32-deep K tiles and at most 16 gathered patch elements per thread
# (deeper or 4-warp 128-row tiles spilled, see _conv_spills_registers).
CONV_CONFIGS = [
    Blocks(128, 64, 32, 8, 3), Blocks(128, 64, 32, 8, 4), Blocks(128, 128, 32, 8, 3), Blocks(64, 128, 32, 4, 3),
    Blocks(64, 128, 32, 4, 4), Blocks(64, 128, 32, 8, 3), Blocks(64, 64, 32, 4, 3), Blocks(64, 64, 32, 4, 4),
    Blocks(32, 128, 32, 4, 3), Blocks(32, 64, 32, 4, 3), Blocks(16, 64, 32, 4, 3), Blocks(16, 128, 32, 4, 3),
]
_SMEM_MARGIN = 16 * 1024  # epilogue tiles (low-rank factors, bias) beside the pipelined K tiles


def _m_bucket(M: int) -> int:
    """Tokens rounded up to a power of two (16 .. 4096): the autotuning key for ``M``."""
    return min(4096, max(16, triton.next_power_of_2(M)))


def _stage_bytes(b: Blocks, int_path: bool, w_bits: int) -> int:
    """Shared memory one pipeline stage holds: the activation tile and the packed weight tile."""
    return b.m * b.k * (1 if int_path else 2) + b.n * b.k * w_bits // 8


def _spills_registers(b: Blocks, int_path: bool, capability: int) -> bool:
    """Candidate tiles measured to spill where the 64-column rule of :func:`_narrow_n` does not
    cover them: on consumer Blackwell, a weight-only tile with more than 32 float32 accumulators
    per thread (128 x 64 with 4 warps: 255 registers, 8 B of stack, 2 STL / 2 LDL)."""
    return not int_path and _consumer_blackwell(capability) and b.m * b.n > 32 * 32 * b.warps


def prune_gemm_configs(configs: list[Blocks], *, M: int, K: int, seg: int, int_path: bool, w_bits: int,
                       narrow_n: bool, smem_limit: int, capability: int) -> list[Blocks]:
    """The candidate tiles that suit one GEMM call (pure Python; never empty).

    * ``BLOCK_K`` never straddles a scale group: where scales change every ``seg`` columns
      (``seg < K``) it divides ``seg``; and it is at least 32 (int8 MMA) / 16 (16-bit MMA);
    * ``BLOCK_M`` follows ``M``: no taller than ``M`` padded to a power of two (at least 16), and at
      least 64 from 256 tokens on;
    * ``BLOCK_N=64`` only where 128-column tiles spill registers (:func:`_narrow_n`), else both;
      no tile that spills on ``sm_<capability>`` (:func:`_spills_registers`);
    * the pipeline stages fit shared memory: ``stages x`` (activation + weight tile) plus a margin.

    When nothing is left, the fixed choice of :func:`_gemm_blocks` is returned alone.
    """
    keep = [
        b for b in configs
        if _suits_call(b, M=M, K=K, seg=seg, int_path=int_path, w_bits=w_bits, smem_limit=smem_limit)
        and (b.n == 64 or not narrow_n) and not _spills_registers(b, int_path, capability)
    ]
    return keep or [_gemm_blocks(M, K, seg, int_path, narrow_n=narrow_n)]


def _suits_call(b: Blocks, *, M: int, K: int, seg: int, int_path: bool, w_bits: int, smem_limit: int) -> bool:
    """The rules every GEMM's candidates share: K tiles inside the scale segments and deep enough for
    the MMA, M tiles that follow ``M``, pipeline stages within shared memory."""
    min_k = 32 if int_path else 16
    k_max = K if seg == K else _pow2_divisor(seg)
    m_max = max(16, triton.next_power_of_2(M))
    return (min_k <= b.k <= max(k_max, min_k) and (seg == K or seg % b.k == 0)
            and b.m <= m_max and (M < 256 or b.m >= 64)
            and b.stages * _stage_bytes(b, int_path, w_bits) + _SMEM_MARGIN <= smem_limit)


def prune_conv_configs(configs: list[Blocks], *, M: int, K: int, seg: int, int_path: bool, w_bits: int,
                       smem_limit: int, capability: int) -> list[Blocks]:
    """The implicit-GEMM convolution's candidate tiles that suit one call (pure Python; never
    empty): :func:`prune_gemm_configs`' rules but the 64-column one, and no tile measured to spill
    on ``sm_<capability>`` (:func:`_conv_spills_registers`); else the fixed :func:`_conv_blocks`."""
    keep = [
        b for b in configs
        if _suits_call(b, M=M, K=K, seg=seg, int_path=int_path, w_bits=w_bits, smem_limit=smem_limit)
        and not _conv_spills_registers(b, capability)
    ]
    return keep or [_conv_blocks(M, K, seg, int_path, fp32=False)]


def _conv_spills_registers(b: Blocks, capability: int) -> bool:
    """Convolution tiles measured to spill at SDXL's 3x3 convolutions (every variant, int8 and
    weight-only, compiled for sm_80/89/90/120 as ``tests/test_kernels_compiled.py`` does):

    * more than 16 gathered patch elements per thread (``BLOCK_M x BLOCK_K / threads``): 128 x 64
      x 32 with 4 warps, 64 x 64 x 64 with 4 and 128 x 64 x 64 with 8 spilled on sm_89, sm_90 and
      sm_120 (8 to 280 B of stack), not on sm_80;
    * 128 x 128 tiles on sm_90 (wgmma): W4A16 (8 B) and W4A8 with zero points and a rank-32
      branch (280 B).
    """
    return b.m * b.k > 16 * 32 * b.warps or (capability == 90 and b.m * b.n >= 128 * 128)


def _to_config(b: Blocks) -> triton.Config:
    return triton.Config({"BLOCK_M": b.m, "BLOCK_N": b.n, "BLOCK_K": b.k, "GROUP_M": b.group_m},
                         num_warps=b.warps, num_stages=b.stages)


def _to_blocks(c: triton.Config) -> Blocks:
    k = c.kwargs
    return Blocks(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages, k.get("GROUP_M", 8))


def _smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` (bytes), as Triton's driver reports it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM:
        _SMEM[index] = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return _SMEM[index]


_SMEM: dict[int, int] = {}


def prune_for_call(configs: list[Blocks], int_path: bool, named_args: dict, kwargs: dict,
                   smem_limit: int, capability: int) -> list[Blocks]:
    """:func:`prune_gemm_configs` for one launch of a GEMM kernel on ``sm_<capability>``: its
    arguments by name and constexprs (:func:`prune_conv_configs` for the convolution kernel's)."""
    M, K = named_args["M"], named_args["K"]
    if "SEG_COL" in named_args:  # _conv_kernel: its segment is the weight groups' and the split's
        seg = math.gcd(K, named_args["W_GROUP"], named_args["SEG_COL"]) if int_path else named_args["W_GROUP"]
        return prune_conv_configs(configs, M=M, K=K, seg=seg, int_path=int_path, w_bits=kwargs["W_BITS"],
                                  smem_limit=smem_limit, capability=capability)
    seg = math.gcd(named_args["W_GROUP"], named_args["A_GROUP"]) if int_path else named_args["W_GROUP"]
    zero_tiles = int_path and kwargs.get("HAS_ZERO", False) and seg != K
    return prune_gemm_configs(
        configs, M=M, K=K, seg=seg, int_path=int_path, w_bits=kwargs["W_BITS"],
        narrow_n=_narrow_n(zero_tiles, named_args["R"] if kwargs.get("HAS_LORA") else 0, weight_only=not int_path,
                           capability=capability), smem_limit=smem_limit, capability=capability,
    )


def _early_prune(int_path: bool | None):
    """``early_config_prune`` for ``triton.autotune``: :func:`prune_for_call` with the device's shared
    memory (``int_path=None``: the convolution kernel, whose ``MODE`` says)."""

    def prune(configs, named_args, **kwargs):
        device = named_args["qw_ptr"].device
        path = int_path if int_path is not None else kwargs["MODE"] == 0
        return [_to_config(b) for b in prune_for_call([_to_blocks(c) for c in configs], path, named_args,
                                                       kwargs, _smem_limit(device), device_capability(device))]

    return prune


_TUNERS: dict[str, object] = {}
# The arguments a tuned tile depends on, per kernel (``triton.autotune`` skips a name the kernel lacks).
TUNING_KEYS = {
    "int": ["M_BUCKET", "N", "K", "W_GROUP", "R", "A_GROUP"],
    "weight_only": ["M_BUCKET", "N", "K", "W_GROUP", "R"],
    "conv": ["M_BUCKET", "N", "K", "W_GROUP", "SEG_COL", "R", "MODE", "W_BITS", "HAS_ZERO", "TAPS", "SH"],
}


def _tuner(kind: str, kernel):
    """The ``triton.autotune`` wrapper of one GEMM kernel, built on first use (never in the interpreter)."""
    if INTERPRET:
        raise RuntimeError("the interpreter runs the fixed _gemm_blocks tiles, it never autotunes")
    if kind not in _TUNERS:
        int_path = None if kind == "conv" else kind == "int"  # one conv tuner for both modes: MODE is in its key
        configs = {"int": INT_CONFIGS, "weight_only": WEIGHT_ONLY_CONFIGS, "conv": CONV_CONFIGS}[kind]
        _TUNERS[kind] = triton.autotune([_to_config(b) for b in configs], key=TUNING_KEYS[kind],
                                        prune_configs_by={"early_config_prune": _early_prune(int_path)})(kernel)
    return _TUNERS[kind]


def _autotuning(x: torch.Tensor) -> bool:
    """Whether a GEMM on ``x``'s device autotunes: CUDA, compiled kernels, ``DIFFQ_AUTOTUNE`` not ``0``."""
    return not INTERPRET and x.device.type == "cuda" and os.environ.get("DIFFQ_AUTOTUNE", "1") != "0"


def winners_path() -> Path:
    """Where the tuned tiles are kept: ``$DIFFQ_CACHE_DIR`` or ``~/.cache/diffq``, ``autotune.json``."""
    root = os.environ.get("DIFFQ_CACHE_DIR") or Path.home() / ".cache" / "diffq"
    return Path(root) / "autotune.json"


_LOADED: set[tuple[str, str]] = set()


def _load_winners(kind: str, tuner, device: torch.device) -> str:
    """Fill ``tuner``'s cache with this GPU's earlier winners (once per process); returns the GPU name."""
    name = torch.cuda.get_device_name(device)
    if (kind, name) not in _LOADED:
        _LOADED.add((kind, name))
        try:
            saved = json.loads(winners_path().read_text()).get(name, {}).get(kind, [])
        except (OSError, ValueError):
            saved = []
        for key, b in saved:
            tuner.cache.setdefault(tuple(key), _to_config(Blocks(*b)))
    return name


def _save_winners(kind: str, tuner, name: str) -> None:
    """Write ``tuner``'s winners for GPU ``name`` into :func:`winners_path` (atomically; best effort)."""
    path = winners_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    entries = [[list(key), list(astuple(_to_blocks(c)))] for key, c in tuner.cache.items()]
    data.setdefault(name, {})[kind] = entries
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
