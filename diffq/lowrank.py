"""Low-rank + residual split of a weight (SVDQuant): a 16-bit branch absorbs the outliers.

``W ≈ (L1 @ L2)^T + R`` with ``L1 = V_r Σ_r`` (``[in, r]``) and ``L2 = U_r^T`` (``[r, out]``) from the
top-``r`` singular triplets of ``W`` (``[out, in]``); only the residual ``R`` is quantized. The layer
computes ``x @ L1 @ L2 + Q(x) @ Q(R)^T``.
"""

from __future__ import annotations

import torch

# Above this many elements the randomized SVD (a few power iterations) replaces the exact one.
EXACT_SVD_MAX_ELEMENTS = 1 << 20


def split_low_rank(weight: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(down [in, r], up [r, out], residual [out, in])`` in float32 for a float ``[out, in]`` weight."""
    w = weight.float()
    rank = min(rank, *w.shape)
    if w.numel() <= EXACT_SVD_MAX_ELEMENTS:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].t()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=min(rank + 16, *w.shape), niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    down = v * s  # [in, r]
    up = u.t().contiguous()  # [r, out]
    residual = w - (down @ up).t()
    return down.contiguous(), up, residual
