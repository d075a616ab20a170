"""Bundled reference models trained by diffq itself on scikit-learn's handwritten digits.

- ``digits-sd``: a Stable Diffusion pipeline (AutoencoderKL, CLIPTextModel, UNet2DConditionModel);
- ``digits-dit``: a PixArt-α pipeline (AutoencoderKL, T5EncoderModel, PixArtTransformer2DModel);
- a digit classifier that judges generated digits and gives FID features.

Both pipelines draw 32×32 digits from prompts like "a handwritten digit 7". Retrain with
``python -m diffq.pipelines.reference.train``. Importing this module loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import DigitClassifier

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_CALL_KWARGS",
    "WEIGHTS_DIR",
    "bundled_path",
    "eval_prompts",
    "load_classifier",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

BUNDLED_MODELS: dict[str, Path] = {
    "digits-sd": WEIGHTS_DIR / "digits-sd",
    "digits-dit": WEIGHTS_DIR / "digits-dit",
}
"""Bundled pipeline name → its diffusers folder (``DiffusionPipeline.from_pretrained`` loads it)."""

DEFAULT_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "digits-sd": {"num_inference_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32},
    "digits-dit": {
        "num_inference_steps": 20,
        "guidance_scale": 5.0,
        "height": 32,
        "width": 32,
        # PixArt's aspect-ratio bins only exist for 256-1024 px models; the bundled one is 32 px.
        "use_resolution_binning": False,
        "clean_caption": False,
    },
}
"""Pipeline call arguments the bundled models were evaluated with (copy before changing)."""


def bundled_path(name: str) -> Path | None:
    """The folder of bundled pipeline ``name``, or ``None`` if the name is unknown or its weights are missing."""
    folder = BUNDLED_MODELS.get(name)
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    return folder


def load_classifier(folder: str | Path | None = None, device: str = "cpu") -> DigitClassifier:
    """Load the bundled digit classifier (eval mode); see :mod:`.classifier`."""
    from .classifier import load_classifier as _load

    return _load(folder, device=device)


def eval_prompts(n: int = 64) -> list[tuple[str, int]]:
    """The bundled evaluation prompts ``[(prompt, digit), ...]``; see :func:`.data.eval_prompts`."""
    from .data import eval_prompts as _eval_prompts

    return _eval_prompts(n)
