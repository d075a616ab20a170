"""Scoring one preset's images: FID against real digits, alignment, CLIP score, fidelity to fp."""

from __future__ import annotations

from typing import Any

import torch

from diffq.metrics.clip_score import ClipScorer, alignment
from diffq.metrics.errors import EvaluationInputError, MissingWeightsError
from diffq.metrics.fid import FID, select_feature_extractor
from diffq.metrics.fidelity import psnr, ssim
from diffq.metrics.images import resize

FID_REFERENCE_SPLIT = "classifier_test"
"""Real digits FID compares against: the split held out from the diffusion models and the classifier."""


def real_digits(size: tuple[int, int]) -> torch.Tensor:
    """The FID reference images (``FID_REFERENCE_SPLIT``) at ``size``, ``[N, 1, H, W]`` in [0, 1]."""
    from diffq.pipelines.reference.data import load_split

    square = size[0] == size[1]
    real, _ = load_split(FID_REFERENCE_SPLIT, size=size[0]) if square else load_split(FID_REFERENCE_SPLIT)
    return resize(real, size)


def _load_classifier(classifier: torch.nn.Module | None) -> torch.nn.Module:
    if classifier is not None:
        return classifier.eval()
    from diffq.pipelines.reference import load_classifier

    try:
        return load_classifier()
    except FileNotFoundError as err:
        raise MissingWeightsError(f"the bundled digit classifier is missing: {err}") from err


class Scorers:
    """The metrics of one evaluation, built once (on the main process) and applied to each preset."""

    def __init__(
        self,
        feature_extractor: str,
        classifier: torch.nn.Module | None,
        clip_model: str | None,
        clip_weights: str | None,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        self.classifier = _load_classifier(classifier)
        try:
            self.feature_name, self.feature = select_feature_extractor(
                feature_extractor, classifier=self.classifier
            )
        except ValueError as err:
            raise EvaluationInputError(str(err)) from err
        self.clip = None
        if clip_model is not None:
            self.clip = ClipScorer(clip_model, clip_weights, device=device)
        self.device = device
        self._fid = None
        self.num_real = 0

    def fid(self, images: torch.Tensor) -> float | None:
        """FID against the real digits (their features are extracted on the first call)."""
        if self._fid is None:
            real = real_digits(tuple(images.shape[-2:]))
            self.num_real = real.shape[0]
            self._fid = FID(self.feature, real, device=self.device)
        return self._fid(images)

    def score(
        self,
        images: torch.Tensor,
        fp_images: torch.Tensor | None,
        prompts: list[str],
        digits: list[int | None],
    ) -> dict[str, Any]:
        """The metric part of a report row (``fid`` ... ``ssim_vs_fp``)."""
        known = [i for i, d in enumerate(digits) if d is not None]
        align = alignment(images[known], [digits[i] for i in known], self.classifier) if known else None
        return {
            "fid": _float(self.fid(images)),
            "alignment": _float(align),
            "clip_score": _float(self.clip(images, prompts) if self.clip is not None else None),
            "psnr_vs_fp": _float(psnr(images, fp_images) if fp_images is not None else None),
            "ssim_vs_fp": _float(ssim(images, fp_images) if fp_images is not None else None),
        }


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)
