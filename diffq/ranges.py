"""Range search: the clipping that minimises quantization error, for weights and activations."""

from __future__ import annotations

import torch

from diffq.formats import IntFormat, block_range, block_view, check_finite, fake_quantize_blocks, range_scales
from diffq.kernels.reference import fake_quantize_activations

WEIGHT_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
ACTIVATION_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
SEARCH_CHUNK_ELEMENTS = 1 << 22
"""Weights are searched this many elements (whole rows) at a time: each candidate's error is a few
float32 copies of what it covers, so the search holds ~100 MiB at most, not 16x the layer's weight."""


def search_weight_clip(
    weight: torch.Tensor,
    fmt: IntFormat,
    importance: torch.Tensor | None = None,
    candidates: tuple[float, ...] = WEIGHT_CLIP_CANDIDATES,
) -> torch.Tensor:
    """Per-block clip ratio (``[rows or 1, blocks]``) minimising the weighted squared error.

    ``importance`` (one value per input column, e.g. the mean square of the activations that
    multiply it) weights the error so that columns that meet large inputs are kept accurate.
    """
    weight = weight.float()
    check_finite(weight)
    rows, cols = weight.shape
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(cols, 1))
    if fmt.granularity == "tensor" or rows <= step:
        return _search_weight_clip(weight, fmt, importance, candidates)
    # Blocks never span rows, so searching rows apart gives the same ratios.
    return torch.cat([_search_weight_clip(weight[start:start + step], fmt, importance, candidates)
                      for start in range(0, rows, step)])


def _search_weight_clip(
    weight: torch.Tensor, fmt: IntFormat, importance: torch.Tensor | None, candidates: tuple[float, ...]
) -> torch.Tensor:
    blocks = block_view(weight, fmt)
    weights = None if importance is None else block_view(importance.float().expand_as(weight), fmt)
    low, high = block_range(blocks, fmt)  # the block ranges, once; each candidate only rescales them
    best_err: torch.Tensor | None = None
    best_ratio: torch.Tensor | None = None
    for ratio in candidates:
        scale, zero = range_scales(low, high, fmt, ratio)
        err = fake_quantize_blocks(blocks, scale, zero, fmt).sub_(blocks).pow_(2)
        if weights is not None:
            err.mul_(weights)
        err = err.sum(dim=-1)
        if best_err is None:
            best_err, best_ratio = err, torch.full_like(err, ratio)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
    assert best_ratio is not None
    return best_ratio


def search_activation_clip(
    rows: torch.Tensor, absmax: float, bits: int, candidates: tuple[float, ...] = ACTIVATION_CLIP_CANDIDATES
) -> float:
    """Clip ratio of a static activation range minimising the squared error on sampled rows."""
    if absmax <= 0 or rows.numel() == 0:
        return 1.0
    qmax = 2 ** (bits - 1) - 1
    rows = rows.float()
    errors = []
    for ratio in candidates:
        scale = torch.tensor(absmax * ratio / qmax)
        errors.append(float((fake_quantize_activations(rows, bits, scale) - rows).pow(2).mean()))
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]
