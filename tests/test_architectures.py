"""Every major architecture family quantizes, stays close to float, keeps the right layers and round-trips.

One tiny pipeline per family (`TINY_ARCHITECTURES`: SD 1.x, SD 2.x, SDXL, PixArt-α, PixArt-Σ, SD3, Flux, Sana,
DiT, Wan video) plus SDXL-Turbo's single step, each quantized with w8a8 and w4a8 after calibrating on one
prompt for two steps, then saved and loaded back with plain diffusers and with `diffq.load`.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

import diffq
from diffq.modules import QUANTIZED_MODULES
from diffq.pipelines import adapter_for, denoiser_of
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import (
    TINY_ARCHITECTURES,
    TINY_CLASS_BUILDERS,
    TINY_IMAGE_SIZE,
    TINY_NUM_FRAMES,
    TINY_PROMPTS,
    TINY_TURBO_CALL_KWARGS,
    TINY_VIDEO_BUILDERS,
    is_class_conditional,
    run_tiny,
    tiny_call_kwargs,
    tiny_dit_pipeline,
    tiny_sdxl_turbo_pipeline,
)

# diffusers' DPM-Solver / Euler-ancestral / UniPC schedulers call np.array on tensors the NumPy 2 way.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PRESETS = ("w8a8", "w4a8")

# PSNR (dB) of the quantized output against the float output of the same seed: 2 steps (SDXL-Turbo: 1),
# calibrated on one prompt for as many steps. Floors are the values measured on CPU (reference kernels) less
# 6 dB (4x the squared error), so a regression in one family shows without flaking on small changes.
#   measured w8a8 / w4a8:  sd 38.0 / 33.4   sd2 32.8 / 28.2   sdxl 40.0 / 35.8   sdxl-turbo 53.7 / 39.7
#   pixart 59.0 / 40.7   pixart-sigma 65.2 / 48.9   sd3 69.0 / 53.4   flux 81.3 / 63.7   sana 58.1 / 40.5
#   dit 63.4 / 46.5 (bare-denoiser calibration, see quantize_tiny)   wan 65.9 / 52.2 (3 frames)
# Scaling any tiny denoiser's prediction by 1.01 costs 54-66 dB, so the spread is the quantization's own:
# the UNets (3x3 convolutions, skip concatenations) lose the most.
MEASURED_PSNR = {
    "sd": (38.0, 33.4),
    "sd2": (32.8, 28.2),
    "sdxl": (40.0, 35.8),
    "sdxl-turbo": (53.7, 39.7),
    "pixart": (59.0, 40.7),
    "pixart-sigma": (65.2, 48.9),
    "sd3": (69.0, 53.4),
    "flux": (81.3, 63.7),
    "sana": (58.1, 40.5),
    "dit": (63.4, 46.5),
    "wan": (65.9, 52.2),
}
MARGIN_DB = 6.0


def psnr_floor(arch: str, preset: str) -> float:
    return MEASURED_PSNR[arch][PRESETS.index(preset)] - MARGIN_DB


# The adapter each family must resolve to.
ADAPTER_OF = {
    "sd": "unet",
    "sd2": "unet",
    "sdxl": "unet",
    "pixart": "pixart",
    "pixart-sigma": "pixart",
    "sd3": "mmdit",
    "flux": "mmdit",
    "sana": "sana",
    "dit": "dit",
    "wan": "wan",
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def expected_shape(arch: str) -> tuple[int, ...]:
    frames = TINY_NUM_FRAMES if arch in TINY_VIDEO_BUILDERS else 1
    return (frames, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)


@cache
def float_output(arch: str) -> np.ndarray:
    """The float pipeline's 2-step output for the first tiny prompt (builders are deterministic)."""
    return run_tiny(TINY_ARCHITECTURES[arch](0))


def denoiser_inputs(pipe: DiffusionPipeline, steps: int) -> list[dict[str, Any]]:
    """The denoiser's forward kwargs over one float run of `steps` steps (for bare-module calibration)."""
    denoiser = denoiser_of(pipe)
    signature = inspect.signature(denoiser.forward)
    captured: list[dict[str, Any]] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind(*args, **kwargs).arguments
        captured.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in bound.items()})

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run_tiny(pipe, steps=steps)
    finally:
        handle.remove()
    return captured


def quantize_tiny(pipe: DiffusionPipeline, preset: str, steps: int = 2, **call_kwargs: Any) -> DiffusionPipeline:
    """Quantize in place, calibrating on the first tiny prompt for `steps` steps.

    `diffq.quantize` calibrates a pipeline by calling it with `prompt=`, which DiTPipeline does not take
    (see `test_dit_pipeline_calibrates_on_class_names`). Meanwhile DiT is calibrated as a bare denoiser on
    the inputs it saw in a float run of the same steps: static activation scales all the same.
    """
    if is_class_conditional(pipe):
        diffq.quantize(denoiser_of(pipe), preset, calibration=denoiser_inputs(pipe, steps), progress=False)
        return pipe
    return diffq.quantize(
        pipe, preset, calibration=TINY_PROMPTS[:1], num_calibration_steps=steps, progress=False,
        **(tiny_call_kwargs(pipe) | call_kwargs),
    )


def check_layers(pipe: DiffusionPipeline, quantizable: list[str], kept: dict[str, str]) -> None:
    """Every layer the adapter quantizes is a diffq module; every kept one is float and in the plan's skipped."""
    denoiser = denoiser_of(pipe)
    plan = plan_of(denoiser)
    assert plan is not None
    assert quantizable and set(plan.layers) == set(quantizable)
    for name in quantizable:
        assert isinstance(denoiser.get_submodule(name), QUANTIZED_MODULES), name
    assert plan.skipped == kept and all(kept.values())
    for name, module in denoiser.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, QUANTIZED_MODULES):
            assert plan.skipped.get(name), f"{name} is float but not documented as kept"
    for name in kept:
        assert not isinstance(denoiser.get_submodule(name), QUANTIZED_MODULES), name


def diffusers_class(pipe: DiffusionPipeline) -> type:
    return next(cls for cls in type(pipe).__mro__ if cls.__module__.startswith("diffusers."))


def check_round_trip(pipe: DiffusionPipeline, expected: np.ndarray, folder: Path, **run_kwargs: Any) -> None:
    """Saved, then loaded by plain diffusers and by diffq.load: bit-identical output for the same seed."""
    diffq.save(pipe, folder)
    for loaded in (DiffusionPipeline.from_pretrained(folder), diffq.load(folder)):
        loaded.set_progress_bar_config(disable=True)
        assert diffusers_class(loaded) is diffusers_class(pipe)  # diffq.load's is managed (its subclass)
        assert plan_of(denoiser_of(loaded)) == plan_of(denoiser_of(pipe))
        if is_class_conditional(pipe):
            assert loaded.labels == pipe.labels  # id2label survived in model_index.json
        assert np.array_equal(run_tiny(loaded, **run_kwargs), expected)


@pytest.mark.parametrize("arch", sorted(TINY_CLASS_BUILDERS | TINY_VIDEO_BUILDERS))
def test_run_tiny_handles_class_conditional_and_video_pipelines(arch):
    """`TINY_BUILDERS` (covered by test_tiny_pipelines.py) leaves these two out: their outputs differ."""
    pipe = TINY_ARCHITECTURES[arch](0)
    images = run_tiny(pipe, TINY_PROMPTS[:2])
    frames = TINY_NUM_FRAMES if arch in TINY_VIDEO_BUILDERS else 1
    assert images.shape == (2 * frames, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert images.dtype == np.float32 and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.0
    assert np.array_equal(run_tiny(TINY_ARCHITECTURES[arch](0), TINY_PROMPTS[:2]), images)
    if is_class_conditional(pipe):  # prompts name the classes
        assert np.array_equal(run_tiny(pipe, class_labels=[0, 1]), images)
        assert not np.array_equal(run_tiny(pipe, class_labels=[1, 0]), images)
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module):
            widths = {m.in_features for m in component.modules() if isinstance(m, nn.Linear)}
            assert all(w % 64 == 0 for w in widths), (name, sorted(widths))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_architecture_quantizes_and_round_trips(arch, preset, tmp_path):
    reference = float_output(arch)
    pipe = TINY_ARCHITECTURES[arch](0)
    denoiser = denoiser_of(pipe)
    adapter = adapter_for(denoiser)
    assert adapter.name == ADAPTER_OF[arch]
    layers, kept = adapter.layers(denoiser)
    content = {name for name in layers if adapter.group_of(name) == "content"}
    assert content and {name for name in layers if ".attn2." in name} <= content

    quantize_tiny(pipe, preset)
    images = run_tiny(pipe)
    assert images.shape == reference.shape == expected_shape(arch)
    assert np.isfinite(images).all()
    assert psnr(images, reference) >= psnr_floor(arch, preset), f"{arch} {preset}: {psnr(images, reference):.1f} dB"
    check_layers(pipe, list(layers), kept)
    check_round_trip(pipe, images, tmp_path / "q")


@pytest.mark.parametrize("preset", PRESETS)
def test_sdxl_turbo_single_step(preset, tmp_path):
    pipe = tiny_sdxl_turbo_pipeline(0)
    reference = run_tiny(pipe, steps=1, **TINY_TURBO_CALL_KWARGS)
    assert pipe.scheduler.timesteps.tolist() == [999]  # "trailing" spacing: the one step starts from noise
    layers, kept = adapter_for(pipe.unet).layers(pipe.unet)
    quantize_tiny(pipe, preset, steps=1, **TINY_TURBO_CALL_KWARGS)
    images = run_tiny(pipe, steps=1, **TINY_TURBO_CALL_KWARGS)
    assert images.shape == reference.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    score = psnr(images, reference)
    assert score >= psnr_floor("sdxl-turbo", preset), f"sdxl-turbo {preset}: {score:.1f} dB"
    check_layers(pipe, list(layers), kept)
    check_round_trip(pipe, images, tmp_path / "q", steps=1, **TINY_TURBO_CALL_KWARGS)


def test_dit_pipeline_calibrates_on_class_names():
    pipe = tiny_dit_pipeline()
    reference = run_tiny(pipe)
    diffq.quantize(
        pipe, "w8a8", calibration=TINY_PROMPTS[:1], num_calibration_steps=2, progress=False,
        **tiny_call_kwargs(pipe),
    )
    images = run_tiny(pipe)
    assert np.isfinite(images).all() and psnr(images, reference) >= psnr_floor("dit", "w8a8")
    with pytest.raises(diffq.DiffQError, match="no label 'no such class'"):
        diffq.quantize(tiny_dit_pipeline(), "w8a8", calibration=["no such class"], progress=False)
