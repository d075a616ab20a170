"""Quantize while loading: each planned layer is quantized as soon as ``from_pretrained`` has read its
weights, and its float weights are dropped, so the float model is never whole in memory.

diffusers builds the model on the meta device and hands the quantizer every tensor it reads
(``check_if_quantized_param`` / ``create_quantized_param``); :class:`LayerLoader` collects a planned
layer's ``weight`` and ``bias``, swaps in the layer's quantized twin (:func:`diffq.convert.convert_layer`,
the same function :func:`diffq.convert` uses, so the result is the model ``diffq.quantize`` would
give) and lets the float tensors go.
"""

from __future__ import annotations

import torch
from torch import nn

from diffq.convert import convert_layer
from diffq.errors import CheckpointError
from diffq.memory import release_file_pages, return_freed_memory
from diffq.plan import QuantPlan


class LayerLoader:
    """Collects the tensors of a plan's layers as they are loaded and quantizes each layer when complete."""

    def __init__(self, model: nn.Module, plan: QuantPlan) -> None:
        self.plan = plan
        self._owner: dict[str, str] = {}  # "layer.weight" -> "layer"
        self._expected: dict[str, set[str]] = {}
        for name in plan.layers:
            tensors = {tensor for tensor, _ in model.get_submodule(name).named_parameters(recurse=False)}
            self._expected[name] = tensors
            self._owner.update({f"{name}.{tensor}": name for tensor in tensors})
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._done: set[str] = set()

    def wants(self, param_name: str) -> bool:
        """Whether ``param_name`` belongs to a layer this loader quantizes."""
        return param_name in self._owner

    def take(self, model: nn.Module, param_name: str, value: torch.Tensor, device: torch.device | str | int) -> None:
        """Keep one loaded tensor; once its layer has all of them, replace the layer by its quantized twin."""
        name = self._owner[param_name]
        pending = self._pending.setdefault(name, {})
        pending[param_name.rsplit(".", 1)[1]] = value.to(device)
        if set(pending) != self._expected[name]:
            return
        layer = model.get_submodule(name)
        tensors = self._pending.pop(name)
        for tensor, loaded in tensors.items():
            setattr(layer, tensor, nn.Parameter(loaded, requires_grad=False))  # the meta layer, now real
        with torch.no_grad():
            quantized = convert_layer(name, layer, self.plan.layers[name], None)
        model.set_submodule(name, quantized)  # the float layer and its weights go with it
        self._done.add(name)
        # Read from a mapped shard, the float weights stay resident as long as the shard's mapping
        # lives (the layers kept in 16 bits hold it): their pages are handed back now.
        release_file_pages(tensors.values())
        return_freed_memory()

    def finish(self) -> None:
        """Check that every planned layer was loaded and quantized."""
        missing = [name for name in self.plan.layers if name not in self._done]
        if missing:
            raise CheckpointError(
                f"{len(missing)} planned layer(s) never received all their weights while loading (e.g. {missing[0]!r}); "
                "the checkpoint does not match the model's config."
            )


__all__ = ["LayerLoader"]
