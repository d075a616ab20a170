"""Fréchet distance between generated and real images, on a pluggable feature extractor.

The distance is the usual Fréchet distance between the Gaussians fitted to the features of the two
sets (computed like torchmetrics' ``FrechetInceptionDistance``); the feature network is one of

- ``"inception-v3"``: the standard FID network (torch-fidelity's port of the TF Inception v3),
  used only when ``torch_fidelity`` is installed *and* its weights are already on disk;
- ``"digit-classifier"``: the penultimate features of the bundled digit classifier, always
  available offline.

Finding the Inception weights never touches the network: :func:`find_inception_weights` only
looks at ``$DIFFQ_INCEPTION_WEIGHTS`` and torch hub's checkpoint folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from diffq.metrics.errors import MissingWeightsError
from diffq.metrics.images import batches, to_rgb

INCEPTION = "inception-v3"
DIGIT_CLASSIFIER = "digit-classifier"
FEATURE_EXTRACTORS = (INCEPTION, DIGIT_CLASSIFIER)

INCEPTION_WEIGHTS_ENV = "DIFFQ_INCEPTION_WEIGHTS"
INCEPTION_WEIGHT_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity >= 0.3
    "pt_inception-2015-12-05-6726825d.pth",  # older torch-fidelity / pytorch-fid
)


def find_inception_weights() -> Path | None:
    """Path of locally available FID Inception weights, or ``None``; never downloads.

    Looks at ``$DIFFQ_INCEPTION_WEIGHTS`` first, then torch hub's ``checkpoints`` folder, where
    torch-fidelity caches its download.
    """
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        return path if path.is_file() else None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_WEIGHT_FILES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    return None


def inception_available() -> bool:
    """Whether the Inception extractor can run offline (torch-fidelity installed, weights on disk)."""
    return importlib.util.find_spec("torch_fidelity") is not None and find_inception_weights() is not None


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception v3, for float images in [0, 1] (1 or 3 channels)."""

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else find_inception_weights()
        if path is None or not path.is_file() or importlib.util.find_spec("torch_fidelity") is None:
            raise MissingWeightsError(
                "The FID Inception v3 network needs `torch-fidelity` installed and its weights on disk "
                f"(set ${INCEPTION_WEIGHTS_ENV} to the .pth file, or put it in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}); use feature extractor "
                f"'{DIGIT_CLASSIFIER}' instead when they are not available."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(path),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (to_rgb(images.float()).clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(x)


class ClassifierFeatures(nn.Module):
    """Penultimate features of a digit classifier (``classifier.features``); always in eval mode."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe = torch.zeros(1, 3, 16, 16, device=_device_of(classifier))
            self.num_features = int(self.classifier.features(probe).shape[-1])

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Stay in eval mode (batch norm / dropout must not change the features)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_rgb(images.float()).to(_device_of(self.classifier))
        return self.classifier.features(x).flatten(1).float()


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def select_feature_extractor(
    choice: str = "auto", *, classifier: nn.Module | None = None
) -> tuple[str, nn.Module]:
    """Pick the FID feature network: ``(name, module)``.

    ``"auto"`` takes Inception v3 when :func:`inception_available` (a local check, no network),
    else the digit classifier. ``"inception-v3"`` raises :class:`MissingWeightsError` when its
    weights are missing; ``"digit-classifier"`` uses ``classifier`` or loads the bundled one.
    """
    if choice not in ("auto", *FEATURE_EXTRACTORS):
        raise ValueError(
            f"unknown feature extractor {choice!r}; expected 'auto' or one of {FEATURE_EXTRACTORS}"
        )
    if choice == INCEPTION or (choice == "auto" and inception_available()):
        return INCEPTION, InceptionFeatures()
    if classifier is None:
        from diffq.pipelines.reference import load_classifier

        classifier = load_classifier()
    return DIGIT_CLASSIFIER, ClassifierFeatures(classifier)


class FID:
    """FID of image sets against one fixed real set (its features are extracted once).

    Images are float ``[N, C, H, W]`` in [0, 1]. The distance is computed in float64 from the
    features' means and covariances, as torchmetrics' ``FrechetInceptionDistance`` does; keeping the
    features lets :meth:`bootstrap` resample them. The metric never syncs across processes: in a
    distributed run, call it on the process that holds all images.
    """

    def __init__(
        self,
        feature: nn.Module,
        real_images: torch.Tensor,
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        if real_images.shape[0] < 2:
            raise ValueError("FID needs at least 2 real images")
        self.feature = feature
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.real_mean, self.real_cov = _moments(self.features(real_images))
        self._real_cov_sqrt = _psd_sqrt(self.real_cov)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` float64 features of ``images`` (on the CPU)."""
        self.feature.to(self.device)
        parts = [
            self.feature(images[idx.start : idx.stop].to(self.device)).double().cpu()
            for idx in batches(images.shape[0], self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)

    def distance(self, fake_features: torch.Tensor) -> float | None:
        """FID of a set given by its features; ``None`` for fewer than 2 images."""
        if fake_features.shape[0] < 2:
            return None
        mean, cov = _moments(fake_features)
        return _frechet(self.real_mean, self.real_cov, self._real_cov_sqrt, mean, cov)

    def __call__(self, fake_images: torch.Tensor) -> float | None:
        """FID of ``fake_images`` against the real set; ``None`` for fewer than 2 images."""
        return self.distance(self.features(fake_images)) if fake_images.shape[0] >= 2 else None

    def bootstrap(self, fake_features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """FID of each resample ``fake_features[indices[b]]`` (``indices``: ``[B, N]``): ``[B]`` float64.

        The real set stays fixed, so the spread is the uncertainty due to the generated images. Use
        the same ``indices`` for every preset scored on the same prompts and seeds: differences of
        their resampled FIDs are then paired (see :func:`bootstrap_indices`).
        """
        return torch.tensor([self.distance(fake_features[row]) for row in indices], dtype=torch.float64)


def bootstrap_indices(num_images: int, replicates: int, seed: int = 0) -> torch.Tensor:
    """``[replicates, num_images]`` indices drawn with replacement from ``num_images``, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_images, (replicates, num_images), generator=generator)


def paired_difference(difference: float, resampled: torch.Tensor) -> dict[str, float]:
    """Summary of ``a − b`` between two presets scored on the same resamples: ``difference`` (on all
    images), ``low``/``high`` (5th and 95th percentiles of the ``resampled`` differences) and
    ``a_lower`` (the share of resamples in which a is lower)."""
    low, high = torch.quantile(resampled, torch.tensor([0.05, 0.95], dtype=resampled.dtype)).tolist()
    return {"difference": difference, "low": low, "high": high, "a_lower": float((resampled < 0).double().mean())}


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of ``[N, D]`` features, in float64."""
    x = features.double()
    mean = x.mean(0)
    centered = x - mean
    return mean, centered.T @ centered / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _frechet(
    mean1: torch.Tensor, cov1: torch.Tensor, cov1_sqrt: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """``|m1 - m2|² + tr(S1 + S2 - 2 (S1 S2)^½)``; ``tr (S1 S2)^½`` is the sum of the square roots of
    the eigenvalues of the symmetric ``S1^½ S2 S1^½``, which has the same spectrum as ``S1 S2``."""
    inner = cov1_sqrt @ cov2 @ cov1_sqrt
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """KID: the unbiased squared maximum mean discrepancy between two feature sets under the cubic
    polynomial kernel ``k(x, y) = (x·y / d + 1)^3`` (Bińkowski et al., 2018). Unlike FID it has no
    bias from the sample sizes, so it also serves small real sets; sizes may differ (each >= 2)."""
    x, y = real_features.double(), fake_features.double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("KID needs at least 2 real and 2 generated images")
    dim = x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / dim + 1) ** 3

    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1)) + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within - 2 * kernel(x, y).mean())


def frechet_distance(
    real_images: torch.Tensor, fake_images: torch.Tensor, feature: nn.Module, *, batch_size: int = 64
) -> float | None:
    """One-off FID between two image sets on ``feature`` (see :class:`FID`)."""
    return FID(feature, real_images, batch_size=batch_size)(fake_images)
