"""Fidelity of quantized images to the full-precision images of the same prompts and seeds.

All functions take float ``[N, C, H, W]`` images in [0, 1] and return the mean over images.
LPIPS needs torchvision backbone weights; it is computed only when they are already on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffq import scores
from diffq.metrics.images import resize, to_rgb
from diffq.scores import PSNR_CAP_DB

_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_LPIPS_MIN_SIZE = 64


def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(f"image sets differ in shape: {tuple(images.shape)} vs {tuple(reference.shape)}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR in dB (data range 1), capped at :data:`PSNR_CAP_DB` (:func:`diffq.scores.psnr`)."""
    _check_pair(images, reference)
    return scores.psnr(images, reference, per_image=True)


def ssim(images: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 64) -> float:
    """Mean SSIM (Gaussian window 11 / sigma 1.5, shrunk to fit images smaller than 11 pixels).

    Computed ``batch_size`` images at a time (torchmetrics' SSIM holds several float64 copies of
    its input, about 5 MB per 32×32 image), then averaged over all images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(images, reference)
    side = min(images.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        raise ValueError(f"images of {tuple(images.shape[-2:])} pixels are too small for SSIM")
    sigma = 1.5 * kernel / 11
    per_image = [
        structural_similarity_index_measure(
            images[i : i + batch_size].double(), reference[i : i + batch_size].double(), data_range=1.0,
            kernel_size=kernel, sigma=sigma, reduction="none",
        )
        for i in range(0, images.shape[0], batch_size)
    ]
    return float(torch.cat(per_image).mean())


def lpips_weights_available(net: str = "alex") -> bool:
    """Whether LPIPS with backbone ``net`` can run offline (torchvision weights already cached)."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(_LPIPS_BACKBONES)}")
    try:
        import torchvision
    except ImportError:
        return False
    url = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


def lpips(images: torch.Tensor, reference: torch.Tensor, *, net: str = "alex") -> float | None:
    """Mean LPIPS distance, or ``None`` when the backbone weights are not on this machine."""
    _check_pair(images, reference)
    if not lpips_weights_available(net):
        return None
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

    a, b = to_rgb(images.float()), to_rgb(reference.float())
    h, w = a.shape[-2:]
    if min(h, w) < _LPIPS_MIN_SIZE:
        scale = _LPIPS_MIN_SIZE / min(h, w)
        size = (round(h * scale), round(w * scale))
        a, b = resize(a, size), resize(b, size)
    return float(learned_perceptual_image_patch_similarity(a, b, net_type=net, normalize=True))


__all__ = ["PSNR_CAP_DB", "lpips", "lpips_weights_available", "psnr", "ssim"]
