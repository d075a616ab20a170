"""Scoring one preset's images: FID against real digits, alignment, CLIP score, fidelity to fp."""

from __future__ import annotations

from typing import Any

import torch

from diffq.metrics.clip_score import ClipScorer, alignment
from diffq.metrics.errors import EvaluationInputError, MissingWeightsError
from diffq.metrics.fid import FID, bootstrap_indices, paired_difference, select_feature_extractor
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
        fid_bootstrap: int = 0,
        bootstrap_seed: int = 0,
    ) -> None:
        if not isinstance(fid_bootstrap, int) or isinstance(fid_bootstrap, bool) or fid_bootstrap < 0:
            raise EvaluationInputError(f"fid_bootstrap must be 0 (off) or a number of resamples, got {fid_bootstrap!r}.")
        self.fid_bootstrap, self.bootstrap_seed = fid_bootstrap, bootstrap_seed
        self.fid_replicates: dict[str, torch.Tensor] = {}  # preset -> resampled FIDs, paired across presets
        self.fid_values: dict[str, float] = {}
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

    def _fid_metric(self, images: torch.Tensor) -> FID:
        if self._fid is None:  # the real digits' features are extracted once, at the first preset's size
            real = real_digits(tuple(images.shape[-2:]))
            self.num_real = real.shape[0]
            self._fid = FID(self.feature, real, device=self.device)
        return self._fid

    def fid(self, images: torch.Tensor, name: str | None = None) -> tuple[float | None, float | None]:
        """FID against the real digits, and its bootstrap standard deviation (``None`` when off).

        With ``fid_bootstrap`` resamples, every preset is resampled with the same image indices
        (image i has the same prompt and seed in every preset), and a ``name``'s resampled FIDs are
        kept for :meth:`fid_differences`.
        """
        metric = self._fid_metric(images)
        features = metric.features(images)
        value = metric.distance(features)
        if value is None or self.fid_bootstrap == 0:
            return value, None
        indices = bootstrap_indices(features.shape[0], self.fid_bootstrap, self.bootstrap_seed)
        replicates = metric.bootstrap(features, indices)
        if name is not None:
            self.fid_replicates[name], self.fid_values[name] = replicates, value
        return value, float(replicates.std())

    def fid_differences(self, names: list[str]) -> dict[str, dict[str, float]]:
        """Paired bootstrap comparison of every two scored presets, in the order of ``names``.

        ``"a vs b"``: ``difference`` (FID of a minus FID of b, full sets), ``low``/``high`` (the 5th
        and 95th percentiles of the resampled differences) and ``a_lower`` (the share of resamples in
        which a has the lower FID).
        """
        scored = [n for n in names if n in self.fid_replicates]
        pairs = {}
        for i, a in enumerate(scored):
            for b in scored[i + 1 :]:
                pairs[f"{a} vs {b}"] = paired_difference(
                    self.fid_values[a] - self.fid_values[b], self.fid_replicates[a] - self.fid_replicates[b]
                )
        return pairs

    def score(
        self,
        images: torch.Tensor,
        fp_images: torch.Tensor | None,
        prompts: list[str],
        digits: list[int | None],
        name: str | None = None,
    ) -> dict[str, Any]:
        """The metric part of a report row (``fid`` ... ``ssim_vs_fp``); ``name`` keeps the preset's
        resampled FIDs for :meth:`fid_differences`."""
        fid, fid_std = self.fid(images, name)
        known = [i for i, d in enumerate(digits) if d is not None]
        align = alignment(images[known], [digits[i] for i in known], self.classifier) if known else None
        return {
            "fid": _float(fid),
            "fid_std": _float(fid_std),
            "alignment": _float(align),
            "clip_score": _float(self.clip(images, prompts) if self.clip is not None else None),
            "psnr_vs_fp": _float(psnr(images, fp_images) if fp_images is not None else None),
            "ssim_vs_fp": _float(ssim(images, fp_images) if fp_images is not None else None),
        }


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)
