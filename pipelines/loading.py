"""Load a diffusers pipeline from a bundled name, a local folder or a Hub id, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffq.errors import ModelLoadError
from diffq.pipelines.single_file import is_single_file, load_single_file

if TYPE_CHECKING:
    import torch

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
        if is_single_file(text):
            return str(Path(text).expanduser()), True
        raise ModelLoadError(
            f"{text!r} is a file; pass the folder that holds model_index.json, or a single-file "
            ".safetensors checkpoint with pipeline_class=."
        )
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


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword for the installed diffusers: ``dtype`` where it exists
    (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (diffusers with ``dtype=``)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_pipeline(
    name_or_path: str | os.PathLike,
    pipeline_class: type | str | None = None,
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
):
    """Load a float pipeline; ``pipeline_class`` defaults to ``diffusers.DiffusionPipeline``.

    A checkpoint file (``model.safetensors``) loads through ``from_single_file`` and needs
    ``pipeline_class``; ``config`` and ``allow_pickle`` apply to it only (``diffq.pipelines.single_file``).
    """
    from diffusers import DiffusionPipeline

    location, is_local = resolve_model(name_or_path)
    if is_single_file(location) and not Path(location).is_dir():  # a file, a missing one, or a Hub file URL
        return load_single_file(location, pipeline_class, config=config, allow_pickle=allow_pickle, **kwargs)
    if config is not None:
        raise ModelLoadError(f"config= is for single-file checkpoints; {location!r} is not one, so drop config=.")
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


def denoiser_weight_files(pipe: Any) -> list[Path]:
    """The safetensors files a pipeline's denoiser was loaded from (``config._name_or_path``: a local
    folder, or a Hub id already in the local cache); empty when they cannot be found."""
    from diffq.offload import denoiser_files
    from diffq.pipelines.adapters import denoiser_name

    source = getattr(pipe, "config", {}).get("_name_or_path")
    if not source:
        return []
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not a Hub id, or not cached: the tensors are spilled instead
            return []
    return denoiser_files(folder / denoiser_name(pipe))
