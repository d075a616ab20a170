"""Quality metrics and the evaluation runner: FID, CLIP score, digit alignment, fidelity to fp.

Importing this package is light: torchmetrics, LPIPS and open_clip are imported only when a metric
runs. The evaluation runner lives in :mod:`diffq.metrics.evaluate`
(``from diffq.metrics.evaluate import evaluate``; ``python -m diffq.metrics.evaluate``).
"""

from diffq.metrics.clip_score import ClipScorer, alignment, clip_score, predict_digits, resolve_clip_weights
from diffq.metrics.errors import EvaluationInputError, MissingWeightsError
from diffq.metrics.fid import (
    FID,
    ClassifierFeatures,
    InceptionFeatures,
    bootstrap_indices,
    find_inception_weights,
    frechet_distance,
    inception_available,
    kernel_distance,
    select_feature_extractor,
)
from diffq.metrics.fidelity import lpips, lpips_weights_available, psnr, ssim

__all__ = [
    "FID",
    "ClassifierFeatures",
    "ClipScorer",
    "EvaluationInputError",
    "InceptionFeatures",
    "MissingWeightsError",
    "alignment",
    "bootstrap_indices",
    "clip_score",
    "find_inception_weights",
    "frechet_distance",
    "inception_available",
    "kernel_distance",
    "lpips",
    "lpips_weights_available",
    "predict_digits",
    "psnr",
    "resolve_clip_weights",
    "select_feature_extractor",
    "ssim",
]
