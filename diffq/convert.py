"""Swap a model's float layers for quantized modules, following a :class:`QuantPlan`."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats
from diffq.errors import QuantizationInputError
from diffq.formats import largest_group_size
from diffq.modules import QuantizedConv2d, QuantizedLinear
from diffq.plan import LayerConfig, QuantPlan


def layer_columns(module: nn.Module) -> int:
    """Length of a weight row: in_features, or in_channels/groups × kernel area."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel()
    raise QuantizationInputError(f"cannot quantize a {type(module).__name__}; only Linear and Conv2d are supported.")


def resolve_config(module: nn.Module, config: LayerConfig) -> LayerConfig:
    """Fit a requested config to a layer: a group size that divides its rows, or per channel."""
    if config.w_group_size is None:
        return config
    cols = layer_columns(module)
    size = largest_group_size(cols, config.w_group_size)
    if size == cols:
        size = None
    a_group = config.a_group_size
    if a_group is not None and isinstance(module, nn.Linear):
        a_group = largest_group_size(cols, a_group)
    return LayerConfig(**{**config.to_dict(), "w_group_size": size, "a_group_size": a_group})


def quantize_layer(module: nn.Module, config: LayerConfig) -> QuantizedLinear | QuantizedConv2d:
    """The quantized twin of one Linear or Conv2d layer."""
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_float(module, config)
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d.from_float(module, config)
    raise QuantizationInputError(f"cannot quantize a {type(module).__name__}; only Linear and Conv2d are supported.")


@torch.no_grad()
def convert_model(
    model: nn.Module, plan: QuantPlan, stats: CalibrationStats | None = None, progress: bool = True
) -> nn.Module:
    """Replace every layer named in ``plan`` by its quantized module, in place; returns ``model``.

    Layers with static activations take their scale from ``stats``.
    """
    for name, config in tqdm(plan.layers.items(), desc="diffq: quantizing layers", disable=not progress):
        layer = model.get_submodule(name)
        quantized = quantize_layer(layer, config)
        if config.a_bits is not None and config.a_mode == "static":
            if stats is None:
                raise QuantizationInputError(
                    f"layer {name!r} needs a static activation scale but no calibration statistics were "
                    "given; calibrate first or use dynamic activations."
                )
            quantized.set_activation_scale(stats.absmax(name))
        model.set_submodule(name, quantized)
    return model


def convert_structure(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Swap planned layers for *empty* quantized modules of the right shapes (for loading weights)."""
    for name, config in plan.layers.items():
        layer = model.get_submodule(name)
        dtype = layer.weight.dtype
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            empty = QuantizedLinear(layer.in_features, layer.out_features, config, bias, dtype)
        elif isinstance(layer, nn.Conv2d):
            empty = QuantizedConv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, config, layer.stride,
                layer.padding, layer.dilation, layer.groups, bias, dtype,
            )
        else:
            raise QuantizationInputError(
                f"plan names {name!r}, a {type(layer).__name__}, but only Linear and Conv2d can be quantized; "
                "the checkpoint does not match this model."
            )
        model.set_submodule(name, empty)
    return model
