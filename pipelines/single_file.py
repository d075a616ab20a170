"""Load a pipeline from one checkpoint file (``model.safetensors``) through diffusers' ``from_single_file``.

A single file holds the weights in an original layout (Stable Diffusion 1.x/2.x and SDXL as the
LDM code saved them, Flux as Black Forest Labs did) but not the configuration, which diffusers
takes from a diffusers folder or Hub id: ``config=``. Without it diffusers guesses a Hub id from
the keys and downloads the configuration, which fails offline. A file that holds only the
denoiser (Flux transformers, UNet-only files) gets the rest of the pipeline from ``config``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from diffq.errors import (
    CheckpointError,
    DiffQError,
    ModelLoadError,
    QuantizationInputError,
    UnsupportedTargetError,
)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES
URL_PREFIXES = ("https://huggingface.co/", "huggingface.co/", "hf.co/", "https://hf.co/")

# Keys of components other than the denoiser; a file without any holds the denoiser alone.
_OTHER_COMPONENTS = ("first_stage_model.", "vae.", "cond_stage_model.", "conditioner.", "text_encoders.")
_DENOISERS = ("unet", "transformer")
_CONFIG_HELP = ("pass config='/path/to/folder' (a diffusers folder of the same architecture with model_index.json, "
                "e.g. one written by save_pretrained; CLI: --config) or a Hub id")


def is_single_file(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a checkpoint file (by its suffix), local or a Hub URL."""
    return Path(os.fspath(name_or_path)).suffix.lower() in SINGLE_FILE_SUFFIXES


def is_url(text: str) -> bool:
    return text.startswith(URL_PREFIXES)


def guess_pipeline(keys: list[str]) -> str | None:
    """The diffusers pipeline class a single file's keys look like, if any."""
    if any(k.startswith("conditioner.embedders.1.") or ".label_emb." in k for k in keys):
        return "StableDiffusionXLPipeline"
    if any("double_blocks." in k for k in keys):
        return "FluxPipeline"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "StableDiffusionPipeline"
    return None


def pipeline_class_named(pipeline_class: type | str) -> type:
    """A diffusers pipeline class that has ``from_single_file``, given as a class or its name."""
    import diffusers
    from diffusers.loaders import FromSingleFileMixin

    cls = getattr(diffusers, pipeline_class, None) if isinstance(pipeline_class, str) else pipeline_class
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UnsupportedTargetError(
            f"pipeline_class={pipeline_class!r} is not a diffusers pipeline class; pass e.g. "
            "StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline (or its name)."
        )
    if not issubclass(cls, FromSingleFileMixin):
        raise UnsupportedTargetError(
            f"diffusers cannot load a {cls.__name__} from a single file (it has no from_single_file); save the "
            "pipeline with save_pretrained and quantize that folder."
        )
    return cls


def single_file_kwargs(target: Any, pipeline_class: type | str | None, config: str | os.PathLike | None) -> dict:
    """``diffq.quantize``'s ``pipeline_class=`` / ``config=`` as loading kwargs, refused where they mean nothing."""
    if pipeline_class is None and config is None:
        return {}
    if not isinstance(target, (str, os.PathLike)) and not (inspect.isclass(target) and config is not None
                                                          and pipeline_class is None):
        raise QuantizationInputError(
            "pipeline_class= and config= describe a single-file checkpoint to load: pass the file as the target "
            "(diffq.quantize('model.safetensors', preset, pipeline_class=..., config=...)), or drop them."
        )
    kwargs: dict[str, Any] = {"config": config} if config is not None else {}
    if pipeline_class is not None:
        kwargs["pipeline_class"] = pipeline_class_named(pipeline_class)
    return kwargs


def checkpoint_keys(path: Path, allow_pickle: bool = False) -> list[str]:
    """The tensor names in a checkpoint file, or a :class:`CheckpointError` if it is not one."""
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises its own error types for headers it cannot parse
            raise CheckpointError(
                f"{path} is not a readable safetensors checkpoint ({type(err).__name__}: {err}); pass a "
                ".safetensors file saved from a model (it may be truncated, or not a checkpoint at all)."
            ) from err
    else:
        import torch

        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        keys = list(state) if isinstance(state, dict) else []
    if not keys:
        raise CheckpointError(f"{path} holds no tensors; pass the checkpoint file of a model.")
    return keys


def _check_file(path: Path, allow_pickle: bool) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; pass the path of a .safetensors checkpoint file.")
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path} is a file but not a checkpoint (suffix {suffix or 'none'}); pass a diffusers folder (with "
            "model_index.json), a bundled name, a Hub id, or a single-file .safetensors checkpoint."
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint ({suffix}), which can run code when it is read; diffq reads single "
            "files as .safetensors. Convert it to .safetensors, or, if you trust the file, pass allow_pickle=True "
            "(diffq.quantize: load_kwargs={'allow_pickle': True}; CLI: --allow-pickle)."
        )


def _check_config(config: str | os.PathLike | None) -> str | None:
    """``config`` as a string: an existing diffusers folder, or a Hub id."""
    if config is None:
        return None
    text = os.fspath(config)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").exists():
            raise ModelLoadError(f"config={text!r} has no model_index.json; {_CONFIG_HELP}.")
        return str(folder)
    if folder.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"config={text!r} is neither a diffusers folder nor a Hub id; {_CONFIG_HELP}.")
    return text


def _denoiser_component(cls: type) -> tuple[str, type]:
    types = cls._get_signature_types()
    for name in _DENOISERS:
        if name in types:
            return name, types[name][0]
    raise UnsupportedTargetError(f"{cls.__name__} has no 'unet' or 'transformer' component for diffq to quantize.")


def _load_denoiser_file(source: str, cls: type, config: str, kwargs: dict) -> Any:
    """A pipeline whose denoiser comes from a denoiser-only file and everything else from ``config``."""
    name, model_class = _denoiser_component(cls)
    if not hasattr(model_class, "from_single_file"):
        raise UnsupportedTargetError(f"diffusers cannot load a {model_class.__name__} from a single file.")
    denoiser = model_class.from_single_file(source, config=config, subfolder=name, **kwargs)
    return cls.from_pretrained(config, **{name: denoiser}, **kwargs)


def load_single_file(
    path: str | os.PathLike,
    pipeline_class: type | str | None,
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> Any:
    """Load ``pipeline_class`` from a single checkpoint file (or a Hub file URL) via ``from_single_file``.

    ``config`` is a diffusers folder or Hub id of the same architecture; ``allow_pickle`` admits
    ``.ckpt``/``.pt`` files; ``kwargs`` go to diffusers (``torch_dtype``, ...).
    """
    text = os.fspath(path)
    remote = is_url(text)
    keys: list[str] = []
    if not remote:
        local = Path(text).expanduser()
        _check_file(local, allow_pickle)
        keys = checkpoint_keys(local, allow_pickle)
        text = str(local)
    if pipeline_class is None:
        guess = guess_pipeline(keys)
        hint = f"; this file looks like a {guess}" if guess else ""
        raise ModelLoadError(
            f"{text} is a single-file checkpoint, which does not say which pipeline it is{hint}: pass "
            f"pipeline_class={guess or 'StableDiffusionPipeline'} (SD 1.x: StableDiffusionPipeline, SDXL: "
            "StableDiffusionXLPipeline, Flux: FluxPipeline; CLI: --pipeline-class)."
        )
    cls = pipeline_class_named(pipeline_class)
    config = _check_config(config)
    if config is not None and Path(config).is_dir():
        kwargs.setdefault("local_files_only", True)  # everything is local: never reach for the Hub
    denoiser_only = bool(keys) and not any(k.startswith(_OTHER_COMPONENTS) for k in keys)
    try:
        if denoiser_only:
            from diffq.pipelines.loading import default_checkpoint

            return _load_denoiser_file(text, cls, config or default_checkpoint(cls), kwargs)
        return cls.from_single_file(text, config=config, **kwargs)
    except DiffQError:
        raise
    except Exception as err:  # diffusers and the Hub raise many types; all mean "could not load"
        if config is None:
            why = (f"Without config=, diffusers fetches the {cls.__name__} configuration"
                   f"{' and the components the file lacks' if denoiser_only else ''} from the Hugging Face Hub; "
                   f"if you are offline, {_CONFIG_HELP}.")
        else:
            why = (f"The configuration{' and the components the file lacks' if denoiser_only else ''} come from "
                   f"config={config!r}: check that the file, pipeline_class and config are the same architecture.")
        raise ModelLoadError(f"could not load {text} as a {cls.__name__} ({type(err).__name__}: {err}). {why}") from err
