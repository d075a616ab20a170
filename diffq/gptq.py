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

Calibration keeps a few hundred input rows per layer, fewer than the inputs of most layers, so ``H``
is then low rank plus the damping's diagonal. Such a Hessian is kept as its rows
(:class:`SampledHessian`) and ``H⁻¹``'s factor is read block by block through the Woodbury identity:
no ``[in, in]`` matrix at all (at Flux's 15,360 inputs, 31 MB instead of 3.8 GB) and about ``in / n``
times fewer operations, the same factor to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffq.formats import IntFormat

DAMPING = 0.01
"""Added to the Hessian's diagonal, as a fraction of its mean (GPTQ's ``percdamp``)."""
BLOCK = 32
"""Columns rounded together before their accumulated error is applied to the rest (GPTQ's lazy batch).
Within a block each column's error updates the block's later columns one outer product at a time; 32
rather than GPTQ's 128 moves most of that work into the one matrix product per block (3–4× faster
on the CPU, the same output error)."""


@dataclass(frozen=True)
class SampledHessian:
    """``H = E[x xᵀ] = yᵀy`` kept as ``y``, the ``n`` sampled input rows over ``√n`` (float64,
    ``[n, channels]``): for layers with more input channels than samples."""

    scaled_rows: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the ``H`` it stands for."""
        channels = self.scaled_rows.shape[1]
        return (channels, channels)


def _smoothed_rows(rows: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    x = rows.detach().double()
    return x / smooth.detach().double() if smooth is not None else x


def input_hessian(rows: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``E[x xᵀ]`` (float64, ``[channels, channels]``) of sampled input rows, divided by the smoothing
    vector when the layer smooths (its weight is then multiplied by it)."""
    x = _smoothed_rows(rows, smooth)
    hessian = x.t() @ x
    return hessian.div_(max(x.shape[0], 1))  # in place: one [channels, channels] matrix, not two


def layer_hessian(rows: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor | SampledHessian:
    """The input Hessian of sampled rows in its cheaper form: :func:`input_hessian` when there are at
    least as many rows as channels, else a :class:`SampledHessian` (``H`` then has rank ≤ rows)."""
    if rows.shape[0] >= rows.shape[1]:
        return input_hessian(rows, smooth)
    x = _smoothed_rows(rows, smooth)
    return SampledHessian(x.div_(max(x.shape[0], 1) ** 0.5))


def _inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` after damping (inputs never seen get a unit diagonal),
    computed in ``h`` (float64, overwritten): with the factor of ``H`` this holds two
    ``[channels, channels]`` matrices at most, not five (at Flux's 15,360 inputs, 3.8 GB, not 9.4)."""
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    diagonal = torch.diagonal(h)
    diagonal += damping * float(diagonal.mean())
    for _ in range(4):  # a near-singular Hessian: damp harder rather than fail
        factor, info = torch.linalg.cholesky_ex(h)  # not in place: a failed try leaves h to damp again
        if int(info) == 0:
            h.copy_(factor)
            del factor
            torch.cholesky_inverse(h, out=h)
            return torch.linalg.cholesky(h, upper=True, out=h)
        diagonal += damping * float(diagonal.mean()) * 10
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def _dense_factor_blocks(hessian: torch.Tensor, damping: float, block: int,
                         overwrite: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    u = _inverse_cholesky(hessian.to(torch.float64, copy=not overwrite), damping)
    for start in range(0, u.shape[0], block):
        stop = min(start + block, u.shape[0])
        yield start, stop, u[start:stop, start:]


def _sampled_factor_blocks(hessian: SampledHessian, damping: float,
                           block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Rows ``start:stop`` of ``U`` (``H⁻¹ = UᵀU``) from the samples. They are ``V⁻ᵀ G``, where ``G``
    are the first rows of ``(H[start:, start:])⁻¹`` and ``V`` the upper factor of its leading block;
    with ``H = yᵀy + A`` (``A`` the damped diagonal) Woodbury gives
    ``G = A⁻¹ - A⁻¹ y_bᵀ M⁻¹ y A⁻¹`` with ``M = I + y A⁻¹ yᵀ`` (``[n, n]``) over the columns left,
    which loses each block's columns as it goes. Damping as :func:`_inverse_cholesky`'s first try."""
    y = hessian.scaled_rows
    n, channels = y.shape
    diagonal = y.square().sum(0)
    dead = diagonal <= 0
    diagonal = torch.where(dead, torch.ones_like(diagonal), diagonal)
    inverse_a = 1.0 / (dead.double() + damping * float(diagonal.mean()))
    m = torch.addmm(torch.eye(n, dtype=y.dtype), y * inverse_a, y.t())
    for start in range(0, channels, block):
        stop = min(start + block, channels)
        y_block, inverse_block = y[:, start:stop], inverse_a[start:stop]
        m_factor, info = torch.linalg.cholesky_ex(m)
        if int(info) != 0:
            raise ValueError("the calibration Hessian's samples gave a Woodbury matrix that is not positive definite")
        g = torch.cholesky_solve(y_block, m_factor).t() @ y[:, start:]
        g.mul_(inverse_a[start:]).mul_(inverse_block[:, None]).neg_()
        g[:, :stop - start].diagonal().add_(inverse_block)
        leading = torch.linalg.cholesky(g[:, :stop - start], upper=True)
        yield start, stop, torch.linalg.solve_triangular(leading.t(), g, upper=False)
        m.addmm_(y_block * inverse_block, y_block.t(), alpha=-1)


def _block_values(
    per_block: torch.Tensor, rows: int, taps: int, start: int, stop: int, fmt: IntFormat
) -> torch.Tensor:
    """Per-block scales or zero points ``[rows, blocks]`` as one value per weight, for the input
    channels ``start:stop`` of the tap-major weight (``[taps × rows, stop - start]``); only those
    columns are expanded, not the whole weight."""
    if fmt.granularity == "group":
        channel = torch.arange(start, stop, device=per_block.device)
        tap = torch.arange(taps, device=per_block.device)
        groups = (channel[None, :] * taps + tap[:, None]) // fmt.group_size  # [taps, n], of column channel×taps+tap
        return per_block[:, groups].permute(1, 0, 2).reshape(taps * rows, stop - start)
    return per_block.reshape(rows, -1)[:, :1].repeat(taps, 1).expand(taps * rows, stop - start)


def gptq_round(
    weight2d: torch.Tensor,
    hessian: torch.Tensor | SampledHessian,
    fmt: IntFormat,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    taps: int = 1,
    damping: float = DAMPING,
    block: int = BLOCK,
    overwrite_hessian: bool = False,
) -> torch.Tensor:
    """``weight2d`` ``[rows, cols]`` rounded onto the grid of ``(scale, zero)`` by GPTQ against
    ``hessian`` (``[cols // taps, cols // taps]``; columns are ``channel × taps + tap``, as a
    convolution's ``[out, in × kh × kw]`` weight). Returns float32 values that lie on the grid.
    With ``overwrite_hessian`` a float64 ``hessian`` is factored in place (it holds ``H⁻¹``'s factor
    afterwards), so no copy of it is made; a :class:`SampledHessian` is never changed."""
    rows, cols = weight2d.shape
    channels = cols // taps
    if hessian.shape != (channels, channels) or channels * taps != cols:
        raise ValueError(f"a Hessian of {tuple(hessian.shape)} does not fit a [{rows}, {cols}] weight with {taps} taps")

    def tap_major(t: torch.Tensor) -> torch.Tensor:  # [rows, channels × taps] -> [taps × rows, channels]
        return t.reshape(rows, channels, taps).permute(2, 0, 1).reshape(taps * rows, channels)

    # the rounding loop runs in float32 (as GPTQ's reference does); H⁻¹'s Cholesky factor in float64.
    # ``w`` holds the weights still to round, and each block's rounded values once it is done (no
    # second weight-sized buffer; scales and zero points are expanded one block at a time).
    w = tap_major(weight2d.float()).clone()
    scale, zero = scale.float(), zero.float() if zero is not None else None
    # H⁻¹'s factor stays float64; each block's rows of it are read in float32 (no float32 copy of all of it)
    if isinstance(hessian, SampledHessian):
        blocks = _sampled_factor_blocks(hessian, damping, block)
    else:
        blocks = _dense_factor_blocks(hessian, damping, block, overwrite_hessian)
    for start, stop, factor_rows in blocks:
        todo, scales = w[:, start:stop].clone(), _block_values(scale, rows, taps, start, stop, fmt)
        zeros = _block_values(zero, rows, taps, start, stop, fmt) if zero is not None else None
        factor = factor_rows[:, :stop - start].float()
        errors = torch.empty_like(todo)
        for j in range(stop - start):
            column = todo[:, j]
            q = torch.round(column / scales[:, j])
            if zeros is not None:
                q = (q + zeros[:, j]).clamp_(fmt.qmin, fmt.qmax) - zeros[:, j]
            else:
                q = q.clamp_(fmt.qmin, fmt.qmax)
            rounded = q * scales[:, j]
            w[:, start + j] = rounded  # this block's columns of ``w`` are not read again
            errors[:, j] = (column - rounded) / factor[j, j]
            if j + 1 < stop - start:
                todo[:, j + 1:].addr_(errors[:, j], factor[j, j + 1:], alpha=-1)
        if stop < channels:
            w[:, stop:].addmm_(errors, factor_rows[:, stop - start:].float(), alpha=-1)
    return w.reshape(taps, rows, channels).permute(1, 2, 0).reshape(rows, cols)


__all__ = ["BLOCK", "DAMPING", "SampledHessian", "gptq_round", "input_hessian", "layer_hessian"]
