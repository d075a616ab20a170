"""Make the current timestep visible to quantized layers.

A pre-forward hook on the denoiser reads its ``timestep`` argument and sets
:func:`diffq.context.current_timestep`, so layers look up step-dependent scales by timestep
*value* (a different ``num_inference_steps`` at inference still works). The hook only stores a
tensor, so ``torch.compile(denoiser, fullgraph=True)`` traces it with the rest of the call.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from diffq.context import set_timestep

_HOOK_ATTR = "_diffq_timestep_hook"


def install_timestep_hook(denoiser: nn.Module) -> None:
    """Install (once) the hook that publishes the denoiser's timestep argument."""
    if getattr(denoiser, _HOOK_ATTR, None) is not None:
        return
    params = list(inspect.signature(denoiser.forward).parameters)
    position = params.index("timestep") if "timestep" in params else None

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "timestep" in kwargs:
            value = kwargs["timestep"]
        elif position is not None and len(args) > position:
            value = args[position]
        else:
            value = None
        set_timestep(value)

    def clear(_module: nn.Module, _args: tuple, _output: Any) -> None:
        set_timestep(None)  # outside a denoiser call there is no current step, even after an error

    handles = (
        denoiser.register_forward_pre_hook(hook, with_kwargs=True),
        denoiser.register_forward_hook(clear, always_call=True),
    )
    object.__setattr__(denoiser, _HOOK_ATTR, handles)


def remove_timestep_hook(denoiser: nn.Module) -> None:
    for handle in getattr(denoiser, _HOOK_ATTR, None) or ():
        handle.remove()
    object.__setattr__(denoiser, _HOOK_ATTR, None)
