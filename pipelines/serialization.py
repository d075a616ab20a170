"""Save a quantized pipeline as a diffusers folder and load it back.

The denoiser's folder holds its packed state (``diffusion_pytorch_model.safetensors``: uint8
codes, scales, biases, activation scales) and its ``config.json`` gains a
``quantization_config`` entry: ``{"quant_method": "diffq", "plan": <QuantPlan>}``. Every other
component is saved by diffusers as usual. Folders are written to a temporary sibling and
renamed into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from diffq.convert import convert_structure
from diffq.errors import CheckpointError
from diffq.pipelines.adapters import denoiser_name, denoiser_of
from diffq.pipelines.patching import install_timestep_hook
from diffq.plan import QuantPlan

QUANT_METHOD = "diffq"
PLAN_ATTR = "diffq_plan"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def plan_of(module: nn.Module) -> QuantPlan | None:
    """The plan a denoiser was quantized with, or ``None`` if it is not quantized by diffq."""
    return getattr(module, PLAN_ATTR, None)


def attach_plan(denoiser: nn.Module, plan: QuantPlan) -> None:
    """Remember the plan on the denoiser and record it in its diffusers config."""
    object.__setattr__(denoiser, PLAN_ATTR, plan)
    if hasattr(denoiser, "register_to_config"):
        denoiser.register_to_config(quantization_config={"quant_method": QUANT_METHOD, "plan": plan.to_dict()})


def save_quantized(pipe: Any, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``pipe`` (quantized or not) to ``directory`` atomically; returns the folder."""
    target = Path(directory).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        pipe.save_pretrained(staging, safe_serialization=True, **kwargs)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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


def _read_state(folder: Path) -> dict:
    try:
        index = folder / WEIGHTS_INDEX_NAME
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
        return load_file(str(folder / WEIGHTS_NAME))
    except FileNotFoundError as err:
        raise CheckpointError(f"weights missing in {folder} ({err.filename}); the checkpoint is incomplete.") from err
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"weights in {folder} are unreadable ({err}); the checkpoint may be truncated.") from err


def load_quantized_denoiser(folder: Path, component: str, config: dict) -> nn.Module:
    """Rebuild a quantized denoiser: its architecture, the plan's empty modules, then the packed state."""
    import diffusers
    from accelerate import init_empty_weights

    class_name = config.get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise CheckpointError(f"{folder / component}/config.json names an unknown model class {class_name!r}.")
    plan = QuantPlan.from_dict(config["quantization_config"]["plan"])
    float_config = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights():
        model = cls.from_config(float_config)
    convert_structure(model, plan)
    state = _read_state(folder / component)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder / component} does not match its plan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}. Re-save it with diffq."
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {folder / component} has tensors of the wrong shape: {err}") from err
    model.eval()
    attach_plan(model, plan)
    install_timestep_hook(model)
    return model


def load_quantized_pipeline(folder: str | os.PathLike, **kwargs: Any):
    """Load a pipeline folder written by :func:`save_quantized`."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    found = quantized_component(folder)
    if found is None:
        raise CheckpointError(f"{folder} holds no diffq-quantized component.")
    component, config = found
    denoiser = load_quantized_denoiser(folder, component, config)
    pipe = DiffusionPipeline.from_pretrained(folder, **{component: denoiser}, **kwargs)
    return pipe


__all__ = [
    "attach_plan",
    "denoiser_name",
    "denoiser_of",
    "load_quantized_pipeline",
    "plan_of",
    "quantized_component",
    "save_quantized",
]
