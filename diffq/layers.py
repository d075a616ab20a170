"""What diffq needs to know of a float layer before quantizing it: the length of its weight rows,
whether it can carry smoothing and a low-rank branch, and a requested config fitted to its shapes.

Planning reads these; nothing here converts a layer (that is :mod:`diffq.convert`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from diffq.errors import QuantizationInputError
from diffq.formats import largest_group_size
from diffq.plan import LayerConfig


def conv_channel_weight(conv: nn.Conv2d) -> torch.Tensor:
    """A convolution's weight as ``[out × kh × kw, in]``: one row per output channel and kernel tap,
    so that per-input-channel statistics (smoothing) read it like a Linear weight."""
    return conv.weight.detach().float().permute(0, 2, 3, 1).reshape(-1, conv.in_channels)


def layer_columns(module: nn.Module) -> int:
    """Length of a weight row: in_features, or in_channels/groups × kernel area."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel()
    raise QuantizationInputError(f"cannot quantize a {type(module).__name__}; only Linear and Conv2d are supported.")


def supports_branch(module: nn.Module) -> bool:
    """Whether a layer can carry smoothing and a low-rank branch: Linear, or Conv2d with groups=1."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def resolve_config(module: nn.Module, config: LayerConfig) -> LayerConfig:
    """Fit a requested config to a layer: weight and activation group sizes that divide its rows
    and input channels (or per channel / per token), and a low-rank branch no wider than the layer
    and only where :func:`supports_branch` (GPTQ rounding too: a grouped convolution's Hessian would
    be per group)."""
    cols = layer_columns(module)
    if config.w_round == "gptq" and not supports_branch(module):
        config = replace(config, w_round="nearest")
    if config.rank:
        rank = min(config.rank, cols, module.weight.shape[0]) if supports_branch(module) else 0
        config = replace(config, rank=rank)
    if config.a_group_size is not None:
        channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        config = replace(config, a_group_size=largest_group_size(channels, config.a_group_size))
    if config.w_group_size is None:
        return config
    size = largest_group_size(cols, config.w_group_size)
    return replace(config, w_group_size=None if size == cols else size)


__all__ = ["conv_channel_weight", "layer_columns", "resolve_config", "supports_branch"]
