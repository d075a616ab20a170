"""A small digit classifier, trained on real digits no diffusion model saw.

It judges generated digits (text-image alignment = agreement with the prompted digit) and gives the
features FID is computed on when no Inception weights are around.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 32
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "classifier"


class DigitClassifier(nn.Module):
    """A small CNN over 32×32 grayscale digits.

    ``forward`` and ``features`` take float images in [0, 1] of shape ``[B, C, H, W]`` with ``C`` 1 or
    3 (three channels are averaged to gray) and any ``H``, ``W`` (resized to 32×32 internally).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.body = nn.Sequential(
            block(1, w), block(w, w), nn.MaxPool2d(2),  # 16×16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8×8
            block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4×4
            block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True), nn.Dropout(0.2))
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """Bring ``[B, C, H, W]`` images in [0, 1] to ``[B, 1, 32, 32]`` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` (used for FID)."""
        p = next(self.parameters())
        x = self.preprocess(images).to(device=p.device, dtype=p.dtype)
        return self.fc(self.body(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted digit per image, ``[B]`` (int64)."""
        out = [self(images[i : i + batch_size]).argmax(dim=1).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def save_classifier(model: DigitClassifier, folder: str | Path, metadata: dict | None = None) -> None:
    """Write ``model.safetensors`` (fp16) and ``config.json`` into ``folder`` (which must exist)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}  # fmt: skip
    save_file(state, str(folder / "model.safetensors"))
    config = {"architecture": "DigitClassifier", **model.config, **(metadata or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load the bundled digit classifier (fp32, eval mode); ``folder`` overrides the bundled one."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"no classifier weights at {weights}; train them with "
            "`python -m diffq.pipelines.reference.train --only classifier`"
        )
    config = json.loads((folder / "config.json").read_text())
    model = DigitClassifier(config["width"], config["feature_dim"], config["num_classes"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
