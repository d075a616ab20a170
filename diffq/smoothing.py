"""SmoothQuant-style smoothing: migrate activation outliers into the weights, per input channel.

With ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``, the layer computes
``(X / s) @ (W * s)^T``, the same function, with flatter activations and slightly rougher weights.
The division by ``s`` is applied in the activation-quantization pass (one read of ``x``); the
multiplication is folded into the quantized weights.
"""

from __future__ import annotations

import torch

from diffq.formats import IntFormat, check_finite, fake_quantize
from diffq.kernels.reference import fake_quantize_activations
from diffq.lowrank import split_low_rank

ALPHA_CANDIDATES = (0.25, 0.4, 0.5, 0.6, 0.75)


def smoothing_vector(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, weight_absmax: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-input-channel smoothing factors (float32). ``weight_absmax``: the weight's absolute max
    per input channel, when the caller already has it."""
    a = act_absmax.float().clamp_min(1e-5)
    w = weight.float().abs().amax(dim=0) if weight_absmax is None else weight_absmax
    w = w.clamp_min(1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-4, 1e4)


def layer_error(
    rows: torch.Tensor,
    weight: torch.Tensor,
    w_fmt: IntFormat,
    a_bits: int | None,
    act_absmax: torch.Tensor,
    smooth: torch.Tensor | None,
    dynamic: bool,
    rank: int = 0,
    a_group_size: int | None = None,
    reference: torch.Tensor | None = None,
) -> float:
    """Mean squared output error of a quantized linear layer on sampled input rows (``reference``:
    the float output ``rows @ weight.T``, when the caller already has it). ``weight`` is not checked
    for NaN/infinity here: :func:`search_alpha` checks it once."""
    reference = rows @ weight.t() if reference is None else reference
    x, w = rows, weight
    absmax = act_absmax
    if smooth is not None:
        x, w, absmax = rows / smooth, weight * smooth, act_absmax / smooth
    branch = 0.0
    if rank:
        down, up, w = split_low_rank(w, rank)
        branch = (x @ down) @ up
    w_q = fake_quantize(w, w_fmt, check=False)
    if a_bits is not None:
        scale = None if dynamic else torch.tensor(float(absmax.max()) / (2 ** (a_bits - 1) - 1), device=x.device)
        x = fake_quantize_activations(x, a_bits, scale, a_group_size if dynamic else None)
    return float((x @ w_q.t() + branch - reference).pow(2).mean())


def search_alpha(
    rows: torch.Tensor,
    weight: torch.Tensor,
    w_fmt: IntFormat,
    a_bits: int | None,
    act_absmax: torch.Tensor,
    dynamic: bool = False,
    candidates: tuple[float, ...] = ALPHA_CANDIDATES,
    rank: int = 0,
    a_group_size: int | None = None,
) -> float | None:
    """The migration strength with the smallest output error on ``rows``; ``None`` if none beats no smoothing.

    With ``rank``, the error is that of the low-rank branch plus the quantized residual.
    """
    rows, weight = rows.float(), weight.float()
    check_finite(weight, "weight")
    best_alpha: float | None = None
    extra = {"rank": rank, "a_group_size": a_group_size, "reference": rows @ weight.t()}
    best = layer_error(rows, weight, w_fmt, a_bits, act_absmax, None, dynamic, **extra)
    weight_absmax = weight.abs().amax(dim=0)
    for alpha in candidates:
        smooth = smoothing_vector(act_absmax, weight, alpha, weight_absmax)
        err = layer_error(rows, weight, w_fmt, a_bits, act_absmax, smooth, dynamic, **extra)
        if err < best * 0.98:  # a clear win only: smoothing costs a vector and a division
            best, best_alpha = err, alpha
    return best_alpha
