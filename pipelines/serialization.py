"""Save a quantized pipeline as a diffusers folder and load it back.

The denoiser's folder holds its packed state (``diffusion_pytorch_model.safetensors``: uint8
codes, scales, biases, activation scales) and its ``config.json`` gains a
``quantization_config`` entry: ``{"quant_method": "diffq", "plan": <QuantPlan>}``. Every other
component is saved by diffusers as usual. Folders are written to a temporary sibling and
renamed into place, so an interrupted save never leaves a half-written checkpoint; which targets may
be written at all is :mod:`diffq.saving`'s policy.
"""

from __future__ import annotations

import contextvars
import json
import os
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from diffq.errors import CheckpointError
from diffq.pipelines.adapters import denoiser_name, denoiser_of
from diffq.pipelines.call_defaults import write_call_defaults
from diffq.plan import QuantPlan
from diffq.saving import check_target, recover, write_folder, written_files

QUANT_METHOD = "diffq"
PLAN_ATTR = "diffq_plan"
_SAVING = contextvars.ContextVar("diffq_saving", default=False)  # inside a policy-guarded save


def plan_of(module: nn.Module) -> QuantPlan | None:
    """The plan a denoiser was quantized with, or ``None`` if it is not quantized by diffq."""
    return getattr(module, PLAN_ATTR, None)


def attach_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Remember the plan on a quantized model and record it in its config (diffusers or transformers)."""
    object.__setattr__(model, PLAN_ATTR, plan)
    entry = {"quant_method": QUANT_METHOD, "plan": plan.to_dict()}
    if hasattr(model, "register_to_config"):  # a diffusers ModelMixin
        model.register_to_config(quantization_config=entry)
    elif hasattr(getattr(model, "config", None), "to_dict"):  # a transformers PreTrainedModel
        model.config.quantization_config = entry
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = types.MethodType(_model_save_pretrained, model)
    if type(model).__name__ == "FluxTransformer2DModel":
        from diffq.pipelines.backend import let_flux_lora_loader_skip_expansion

        let_flux_lora_loader_skip_expansion()  # its LoRA loader would read float weights diffq does not keep


def _model_save_pretrained(self: Any, save_directory: str | os.PathLike, *args: Any, overwrite: bool = False,
                           **kwargs: Any) -> Any:
    """A quantized model's ``save_pretrained``, under :mod:`diffq.saving`'s policy (see :func:`save_with_policy`)."""
    return save_with_policy(self, type(self).save_pretrained.__get__(self), save_directory, *args,
                            overwrite=overwrite, **kwargs)


_model_save_pretrained.__name__ = "save_pretrained"  # what pickling a bound method looks up again


def source_folders(pipe: Any) -> list[Path]:
    """The local folders the pipeline's (and each component's) files were loaded from."""
    found = []
    for obj in (pipe, *getattr(pipe, "components", {}).values()):
        config = getattr(obj, "config", None)
        for name in (getattr(obj, "name_or_path", None), getattr(config, "_name_or_path", None)):
            if isinstance(name, (str, os.PathLike)) and str(name) and Path(name).expanduser().is_dir():
                found.append(Path(name).expanduser())
    return found


def is_diffq_folder(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint diffq wrote (its marker, or an older diffq-quantized pipeline or model)."""
    if written_files(folder) is not None or quantized_component(folder) is not None:
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def check_save_target(pipe: Any, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise what :func:`save_quantized` would raise for ``directory`` before anything is written
    (so a command can refuse a target before it spends minutes quantizing)."""
    check_target(Path(directory), overwrite=overwrite, sources=source_folders(pipe), is_checkpoint=is_diffq_folder)


def save_with_policy(obj: Any, save: Callable[..., Any], directory: str | os.PathLike, *args: Any,
                     overwrite: bool = False, **kwargs: Any) -> Any:
    """Run ``save(folder, *args, **kwargs)`` (a diffusers/transformers ``save_pretrained``) for
    ``obj`` under :mod:`diffq.saving`'s policy: into a staging folder renamed over ``directory``.

    The pipeline's call defaults are recorded beside its files. A save inside another guarded
    save (a pipeline saving its quantized denoiser) writes straight into the staging folder.
    """
    if _SAVING.get():
        return save(directory, *args, **kwargs)
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = Path(directory).name  # diffusers would otherwise name the repo after the staging folder
    result = None

    def write(staging: Path) -> None:
        nonlocal result
        result = save(staging, *args, **kwargs)
        write_call_defaults(obj, staging)

    token = _SAVING.set(True)
    try:
        write_folder(directory, write, overwrite=overwrite, sources=source_folders(obj), is_checkpoint=is_diffq_folder)
    finally:
        _SAVING.reset(token)
    return result


def save_quantized(pipe: Any, directory: str | os.PathLike, *, overwrite: bool = False,
                   extra_files: Mapping[str, str | bytes] | None = None, **kwargs: Any) -> Path:
    """Write ``pipe`` (quantized or not) to ``directory`` under :mod:`diffq.saving`'s policy; returns the folder.

    ``extra_files`` (name -> text or bytes) are written into the checkpoint with it, in the same swap."""

    def save(folder: str | os.PathLike, **options: Any) -> Any:
        result = pipe.save_pretrained(folder, **options)
        for name, content in (extra_files or {}).items():
            (Path(folder) / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return result

    save_with_policy(pipe, save, directory, overwrite=overwrite, safe_serialization=True, **kwargs)
    return Path(directory).expanduser().resolve()


def quantized_component(folder: Path) -> tuple[str, dict] | None:
    """``(component, config)`` of the diffq-quantized denoiser in a pipeline folder, if any."""
    index = folder / "model_index.json"
    if not index.exists():
        return None
    for component in json.loads(index.read_text()):
        config_path = folder / component / "config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            quant = config.get("quantization_config") or {}
            if quant.get("quant_method") == QUANT_METHOD:
                return component, config
    return None


def load_quantized_pipeline(folder: str | os.PathLike, **kwargs: Any):
    """Load a pipeline folder written by :func:`save_quantized` (through the diffusers backend)."""
    from diffusers import DiffusionPipeline

    from diffq.pipelines.backend import register
    from diffq.pipelines.managed import manage

    register()
    folder = Path(folder)
    recover(folder)  # a save killed between its two renames left the earlier checkpoint aside
    if quantized_component(folder) is None:
        raise CheckpointError(f"{folder} holds no diffq-quantized component.")
    try:
        return manage(DiffusionPipeline.from_pretrained(folder, **kwargs))
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"could not load the diffq checkpoint at {folder} ({type(err).__name__}: {str(err)[:400]}). It may be "
            "truncated or not match its plan; quantize and save it again."
        ) from err


__all__ = [
    "attach_plan",
    "check_save_target",
    "denoiser_name",
    "denoiser_of",
    "load_quantized_pipeline",
    "plan_of",
    "quantized_component",
    "save_quantized",
    "save_with_policy",
    "source_folders",
]
