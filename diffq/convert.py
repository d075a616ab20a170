"""Swap a model's float layers for quantized modules, following a :class:`QuantPlan`."""

from __future__ import annotations

import bisect

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats, timestep_groups
from diffq.errors import CheckpointError, QuantizationInputError
from diffq.gptq import SampledHessian, layer_hessian
from diffq.layers import conv_channel_weight, supports_branch
from diffq.lowrank import split_low_rank
from diffq.memory import release_file_pages, return_freed_memory
from diffq.modules import QMODULES, QUANTIZED_MODULES, quantized_class, weight_format
from diffq.offload import loaded, release
from diffq.plan import LayerConfig, QuantPlan
from diffq.ranges import search_activation_clip, search_weight_clip
from diffq.smoothing import smoothing_vector


def _check_float(layer: nn.Module, name: str = "this layer") -> None:
    if isinstance(layer, QUANTIZED_MODULES):
        raise QuantizationInputError(f"{name} is already quantized; load the float model to quantize it again.")


def _activation_scales(
    name: str, config: LayerConfig, stats: CalibrationStats, smooth: torch.Tensor | None, channels: int
) -> tuple[torch.Tensor, list[float]]:
    """Static activation absmax ``[groups, segments]`` (clipped as configured) and timestep bounds."""
    timesteps = [t for t in stats.timesteps(name) if t >= 0] or stats.timesteps(name)
    bounds = timestep_groups(timesteps, config.a_groups) if config.a_groups > 1 else []
    if len(bounds) != config.a_groups - 1:
        raise QuantizationInputError(
            f"layer {name!r} wants {config.a_groups} timestep groups but was calibrated on {len(timesteps)} "
            "steps; calibrate with more steps or fewer groups."
        )
    members: list[list[float]] = [[] for _ in range(config.a_groups)]
    for t in timesteps:
        members[bisect.bisect_right(bounds, t)].append(t)
    edges = [0, config.a_split, channels] if config.a_split else [0, channels]
    table = torch.zeros(config.a_groups, len(edges) - 1)
    smooth = None if smooth is None else smooth.cpu()  # with the statistics, which are on the CPU
    for g, steps in enumerate(members):
        channel_absmax = stats.channel_absmax(name, steps)
        rows = stats.sample(name, steps) if config.a_clip == "mse" else None
        if smooth is not None:
            channel_absmax = channel_absmax / smooth
            rows = None if rows is None else rows / smooth
        for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            absmax = float(channel_absmax[lo:hi].max())
            ratio = 1.0
            if config.a_clip == "mse" and rows is not None:
                ratio = search_activation_clip(rows[:, lo:hi], absmax, config.a_bits)
            elif config.a_clip == "percentile":
                ratio = min(1.0, stats.percentile(name, 99.99, steps) / max(stats.absmax(name, steps), 1e-12))
            table[g, s] = absmax * ratio
    return table, bounds


def _weight_to_quantize(
    name: str, layer: nn.Linear | nn.Conv2d, config: LayerConfig, stats: CalibrationStats | None, rows: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """``(smooth, weight, lowrank, importance)`` of one layer: its smoothing vector, the ``[out, cols]``
    weight that will be quantized (smoothed, the low-rank branch taken out), the branch, and how large
    the activations meeting each weight column are (for the clip search; ``None`` without samples)."""
    linear = isinstance(layer, nn.Linear)
    taps = 1 if linear else layer.kernel_size[0] * layer.kernel_size[1]
    smooth = None
    if config.smooth_alpha is not None:
        channel_weight = layer.weight if linear else conv_channel_weight(layer)
        absmax = stats.channel_absmax(name).to(channel_weight.device)
        smooth = smoothing_vector(absmax, channel_weight.detach(), config.smooth_alpha)
    weight2d = layer.weight.float().reshape(layer.weight.shape[0], -1)
    if smooth is not None:
        weight2d = weight2d * smooth.repeat_interleave(taps)
    lowrank = None
    if config.rank:
        down, up, weight2d = split_low_rank(weight2d, config.rank)
        lowrank = (down, up)
    importance = None
    if rows is not None and supports_branch(layer):
        scaled_rows = rows / (1 if smooth is None else smooth)
        importance = scaled_rows.pow(2).mean(dim=0).repeat_interleave(taps)
    return smooth, weight2d, lowrank, importance


def _weight_clip(layer: nn.Module, config: LayerConfig, weight2d: torch.Tensor, importance: torch.Tensor | None):
    if config.w_clip != "mse":
        return 1.0
    return search_weight_clip(weight2d, weight_format(config), importance)


@torch.no_grad()
def _quantized_class(layer: nn.Module, name: str, why: str = "keep it in 16-bit") -> type[nn.Module]:
    found = quantized_class(layer)
    if found is None:
        supported = ", ".join(sorted(cls.__name__ for cls in QMODULES))
        raise QuantizationInputError(
            f"plan names {name!r}, a {type(layer).__name__}; diffq quantizes {supported} layers ({why})."
        )
    return found


def _gptq_hessian(name: str, config: LayerConfig, rows: torch.Tensor | None,
                  smooth: torch.Tensor | None) -> torch.Tensor | SampledHessian | None:
    """The input Hessian GPTQ rounds against, for a layer planned with ``w_round="gptq"``."""
    if config.w_round != "gptq":
        return None
    if rows is None or rows.shape[0] < 2:
        raise QuantizationInputError(
            f"layer {name!r} is planned with GPTQ rounding, which needs sampled calibration inputs; calibrate "
            "first (diffq.calibrate) or use weight_rounding='nearest'."
        )
    return layer_hessian(rows, smooth)


def _planned_layers(model: nn.Module, plan: QuantPlan, error: type[Exception], advice: str) -> dict[str, nn.Module]:
    """The modules ``plan`` names, or ``error`` (before any layer is swapped) when the model lacks some:
    the plan was made for another model."""
    names = dict(model.named_modules())
    missing = [name for name in plan.layers if name not in names]
    if missing:
        raise error(
            f"the plan names {len(missing)} of its {len(plan.layers)} layers that this {type(model).__name__} does "
            f"not have (e.g. {missing[0]!r}); it was made for another model. {advice}"
        )
    return {name: names[name] for name in plan.layers}


def convert_model(
    model: nn.Module, plan: QuantPlan, stats: CalibrationStats | None = None, progress: bool = True
) -> nn.Module:
    """Replace every layer named in ``plan`` by its quantized module, in place; returns ``model``.

    Layers with static activations, smoothing, MSE clipping or BOS handling read ``stats``. A model
    whose weights are on disk (:mod:`diffq.offload`) has each float layer read just before it is
    quantized, and gone once its quantized twin is in place; float weights mapped from a checkpoint
    leave the resident set then (:func:`diffq.memory.release_file_pages`).
    """
    planned = _planned_layers(model, plan, QuantizationInputError, "Allocate a plan for this one (diffq.allocate).")
    for name, config in tqdm(plan.layers.items(), desc="diffq: quantizing layers", disable=not progress):
        layer = planned.pop(name)
        with loaded(layer):
            quantized = convert_layer(name, layer, config, stats)
        model.set_submodule(name, quantized)
        if release(layer):
            return_freed_memory()
        else:  # weights read through a checkpoint's memory map leave the resident set too
            release_file_pages(p.detach() for p in layer.parameters())
    return model


def needs_statistics(config: LayerConfig) -> bool:
    """Whether quantizing a layer with ``config`` reads calibration statistics."""
    return config.static_activations or config.smooth_alpha is not None or config.bos or config.w_round == "gptq"


@torch.no_grad()  # the weights are parameters: without it the searches keep autograd graphs (~28x a weight)
def convert_layer(name: str, layer: nn.Module, config: LayerConfig, stats: CalibrationStats | None) -> nn.Module:
    """The quantized twin of one float layer (``layer`` is read, not modified)."""
    _check_float(layer, repr(name))
    if needs_statistics(config) and stats is None:
        raise QuantizationInputError(
            f"layer {name!r} needs calibration statistics (static activations, smoothing, BOS or GPTQ); "
            "calibrate first, or use an -rtn preset with activations='dynamic'."
        )
    quantized_cls = _quantized_class(layer, name)
    rows = stats.sample(name) if stats is not None else None
    if rows is not None:
        rows = rows.to(layer.weight.device)  # the statistics are on the CPU; the weight may be on a GPU
    smooth, weight2d, lowrank, importance = _weight_to_quantize(name, layer, config, stats, rows)
    clip = _weight_clip(layer, config, weight2d, importance)
    bos = stats.bos.get(name) if config.bos else None
    hessian = _gptq_hessian(name, config, rows, smooth)
    quantized = quantized_cls.from_float(layer, config, smooth=smooth, clip_ratio=clip, bos_input=bos,
                                         lowrank=lowrank, hessian=hessian)
    if config.static_activations:
        table, bounds = _activation_scales(name, config, stats, smooth, quantized.input_channels)
        quantized.set_activation_scale(table, bounds)
    return quantized


def convert_structure(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Swap planned layers for *empty* quantized modules of the right shapes (for loading weights)."""
    planned = _planned_layers(model, plan, CheckpointError, "The checkpoint does not match its model; quantize and "
                              "save it again.")
    for name, config in plan.layers.items():
        layer = planned[name]
        empty = _quantized_class(layer, name, "the checkpoint does not match this model").empty_like(layer, config)
        model.set_submodule(name, empty)
    return model
