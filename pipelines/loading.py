"""Load a diffusers pipeline from a bundled name, a local folder or a Hub id, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffq.errors import ModelLoadError

# The checkpoint `diffq.quantize(<PipelineClass>, preset)` loads when no `model=` is given.
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "StableDiffusionPipeline": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "StableDiffusionXLPipeline": "stabilityai/stable-diffusion-xl-base-1.0",
    "PixArtAlphaPipeline": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "PixArtSigmaPipeline": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "StableDiffusion3Pipeline": "stabilityai/stable-diffusion-3-medium-diffusers",
    "FluxPipeline": "black-forest-labs/FLUX.1-dev",
    "SanaPipeline": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "DiTPipeline": "facebook/DiT-XL-2-256",
}


def bundled_models() -> dict[str, Path]:
    """Bundled reference models: name -> folder (only those whose weights are installed)."""
    from diffq.pipelines import reference

    models = getattr(reference, "BUNDLED_MODELS", {})
    return {name: Path(path) for name, path in models.items() if (Path(path) / "model_index.json").exists()}


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """``(location, is_local)``: a bundled name or existing folder becomes a local path."""
    text = os.fspath(name_or_path)
    bundled = bundled_models()
    if text in bundled:
        return str(bundled[text]), True
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser()), True
    if Path(text).expanduser().exists():
        raise ModelLoadError(f"{text!r} is a file; pass the folder that holds model_index.json.")
    return text, False


def default_checkpoint(pipeline_class: type) -> str:
    """The documented default checkpoint of a pipeline class."""
    try:
        return DEFAULT_CHECKPOINTS[pipeline_class.__name__]
    except KeyError:
        raise ModelLoadError(
            f"diffq has no default checkpoint for {pipeline_class.__name__}; pass model='<hub id or folder>' "
            f"(classes with defaults: {', '.join(sorted(DEFAULT_CHECKPOINTS))})."
        ) from None


def load_pipeline(name_or_path: str | os.PathLike, pipeline_class: type | None = None, **kwargs: Any):
    """Load a float pipeline; ``pipeline_class`` defaults to ``diffusers.DiffusionPipeline``."""
    from diffusers import DiffusionPipeline

    location, is_local = resolve_model(name_or_path)
    cls = pipeline_class or DiffusionPipeline
    if is_local and not (Path(location) / "model_index.json").exists():
        raise ModelLoadError(f"{location} has no model_index.json; it is not a diffusers pipeline folder.")
    try:
        return cls.from_pretrained(location, **kwargs)
    except Exception as err:  # diffusers/hub raise many types; all mean "could not load"
        bundled = ", ".join(sorted(bundled_models())) or "none installed"
        where = "the local folder" if is_local else "the Hugging Face Hub"
        raise ModelLoadError(
            f"could not load {location!r} from {where} ({type(err).__name__}: {err}). "
            f"If you are offline, pass a local folder (model='/path/to/pipeline') or a bundled model "
            f"({bundled})."
        ) from err
