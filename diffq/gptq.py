"""Error-compensating weight rounding (GPTQ; Frantar et al., 2023) on diffq's fixed weight grids.

Round-to-nearest rounds each weight alone. GPTQ rounds one input column at a time and moves that
column's rounding error onto the columns not yet rounded, in proportion to the inverse Hessian
``H = E[x xᵀ]`` of the layer's calibration inputs, so the layer's *output* error on those inputs
shrinks, not each weight's. The scales (and zero points) are chosen first, from the weight and its
clip ratios, exactly as round-to-nearest chooses them; GPTQ only picks different codes on that
grid, so the stored format is unchanged.

Convolutions: calibration samples per-pixel input vectors, not patches, so the Hessian over a
convolution's ``in × taps`` columns is taken as ``H_c ⊗ I`` (kernel taps uncorrelated). In
tap-major order that matrix is block diagonal with one ``H_c`` per tap, so a convolution is
rounded as one ``[out × taps, in]`` matrix against ``H_c``: no ``(in · taps)²`` matrix is formed.
"""

from __future__ import annotations

import torch

from diffq.formats import IntFormat

DAMPING = 0.01
"""Added to the Hessian's diagonal, as a fraction of its mean (GPTQ's ``percdamp``)."""
BLOCK = 128
"""Columns rounded together before their accumulated error is applied to the rest (GPTQ's lazy batch)."""


def input_hessian(rows: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``E[x xᵀ]`` (float64, ``[channels, channels]``) of sampled input rows, divided by the smoothing
    vector when the layer smooths (its weight is then multiplied by it)."""
    x = rows.detach().double()
    if smooth is not None:
        x = x / smooth.detach().double()
    return x.t() @ x / max(x.shape[0], 1)


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` after damping (inputs never seen get a unit diagonal)."""
    h = hessian.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    diagonal = torch.diagonal(h)
    diagonal += damping * float(diagonal.mean())
    for _ in range(4):  # a near-singular Hessian: damp harder rather than fail
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        diagonal += damping * float(diagonal.mean()) * 10
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def _expand(per_block: torch.Tensor, rows: int, cols: int, fmt: IntFormat) -> torch.Tensor:
    """Per-block scales or zero points ``[rows, blocks]`` as one value per weight ``[rows, cols]``."""
    if fmt.granularity == "group":
        return per_block.repeat_interleave(fmt.group_size, dim=1)[:, :cols]
    return per_block.reshape(rows, -1)[:, :1].expand(rows, cols)


def gptq_round(
    weight2d: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    taps: int = 1,
    damping: float = DAMPING,
    block: int = BLOCK,
) -> torch.Tensor:
    """``weight2d`` ``[rows, cols]`` rounded onto the grid of ``(scale, zero)`` by GPTQ against
    ``hessian`` (``[cols // taps, cols // taps]``; columns are ``channel × taps + tap``, as a
    convolution's ``[out, in × kh × kw]`` weight). Returns float32 values that lie on the grid."""
    rows, cols = weight2d.shape
    channels = cols // taps
    if hessian.shape != (channels, channels) or channels * taps != cols:
        raise ValueError(f"a Hessian of {tuple(hessian.shape)} does not fit a [{rows}, {cols}] weight with {taps} taps")

    def tap_major(t: torch.Tensor) -> torch.Tensor:  # [rows, channels × taps] -> [taps × rows, channels]
        return t.reshape(rows, channels, taps).permute(2, 0, 1).reshape(taps * rows, channels)

    w = tap_major(weight2d.double()).clone()
    s = tap_major(_expand(scale.double(), rows, cols, fmt))
    z = tap_major(_expand(zero.double(), rows, cols, fmt)) if zero is not None else None
    u = _inverse_cholesky(hessian.double(), damping)
    out = torch.empty_like(w)
    for start in range(0, channels, block):
        stop = min(start + block, channels)
        errors = torch.empty(w.shape[0], stop - start, dtype=w.dtype)
        for i in range(start, stop):
            column = w[:, i]
            q = torch.round(column / s[:, i])
            if z is not None:
                q = (q + z[:, i]).clamp(fmt.qmin, fmt.qmax) - z[:, i]
            else:
                q = q.clamp(fmt.qmin, fmt.qmax)
            out[:, i] = q * s[:, i]
            error = (column - out[:, i]) / u[i, i]
            w[:, i + 1:stop] -= error.unsqueeze(1) * u[i, i + 1:stop].unsqueeze(0)
            errors[:, i - start] = error
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return out.reshape(taps, rows, channels).permute(1, 2, 0).reshape(rows, cols).float()


__all__ = ["BLOCK", "DAMPING", "gptq_round", "input_hessian"]
