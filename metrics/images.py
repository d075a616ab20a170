"""Image batch helpers shared by the metrics: one layout (float NCHW in [0, 1]) for everything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def as_image_batch(images: Any) -> torch.Tensor:
    """Convert pipeline output to a float32 CPU tensor ``[N, C, H, W]`` in [0, 1].

    Accepts a tensor (NCHW, or NHWC when the last axis has 1, 3 or 4 channels and the second
    does not), a numpy array in the same layouts (uint8 is scaled by 1/255), a single image, or a
    list of PIL images / arrays / tensors.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().to("cpu")
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("empty image list")
        return torch.cat([as_image_batch(im) for im in images], dim=0)
    elif hasattr(images, "convert") and hasattr(images, "size"):  # a PIL image
        x = torch.from_numpy(np.asarray(images).copy())
        if x.ndim == 2:
            x = x.unsqueeze(-1)
        x = x.unsqueeze(0).permute(0, 3, 1, 2)
    else:
        raise TypeError(f"cannot read images from {type(images).__name__}")

    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x.unsqueeze(0)  # one image, CHW or HWC (sorted out below)
    if x.ndim != 4:
        raise ValueError(f"expected images with 4 dims [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.clamp(0.0, 1.0).contiguous()


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Make ``[N, C, H, W]`` images three-channel: gray is repeated, an alpha channel dropped."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 4:
        return images[:, :3]
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``[N, C, H, W]`` images to ``size`` (antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp(0.0, 1.0)


def batches(n: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of at most ``batch_size`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
