"""How close an output is to the full-precision one, in decibels: the one definition of PSNR.

Images are float tensors in [0, 1] (data range 1). ``psnr`` pools the squared error over every
pixel of every image (what the plan check and the image sensitivity metric score); with
``per_image=True`` it is the mean of each image's PSNR (what fidelity tables report, as SVDQuant's
do). Identical images score ``cap`` instead of infinity; images with NaN or infinity score ``-inf``.
"""

from __future__ import annotations

import math

import torch

PSNR_CAP_DB = 100.0
"""The PSNR of identical images (infinite) is reported as this value, so reports stay valid JSON."""


def _db(mse: torch.Tensor, cap: float) -> torch.Tensor:
    db = 10 * torch.log10(1 / mse)
    db = torch.where(mse == 0, torch.full_like(db, cap), db.clamp(max=cap))
    return torch.where(torch.isfinite(mse), db, torch.full_like(db, -math.inf))


def psnr(images: torch.Tensor, reference: torch.Tensor, *, per_image: bool = False, cap: float = PSNR_CAP_DB) -> float:
    """PSNR (dB) of ``images`` against ``reference``: of the pooled mean squared error, or the mean
    over images (``[N, ...]``) of each image's PSNR."""
    error = (images.double() - reference.double()).pow(2)
    if not per_image:
        return float(_db(error.mean(), cap))
    return float(_db(error.flatten(1).mean(dim=1), cap).mean())


__all__ = ["PSNR_CAP_DB", "psnr"]
