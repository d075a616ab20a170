"""What the denoiser is doing now, visible to quantized layers and to calibration.

A pre-forward hook on the denoiser (installed by :mod:`diffq.pipelines.patching`) sets the
current timestep from the denoiser's ``timestep`` argument; layers read it to pick a
step-dependent activation scale, and calibration reads it to file statistics per step. During
calibration the pipeline runner also says whether the batch is ``[unconditional, conditional]``
(classifier-free guidance), so statistics can be kept per half.

The state is an attribute of one plain object rather than a ``ContextVar``: ``torch.compile``
traces attribute writes on an object (the hook runs inside the compiled region) but not
``ContextVar.set``. The timestep is kept as a float64 tensor so that layers look their scale up
with tensor operations, without a host synchronisation or a graph break. One consequence: two
threads running denoisers at the same moment share it (run one denoiser call at a time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class _DenoiserState:
    """The timestep of the denoiser call in progress (``None`` outside one) and the CFG flag."""

    timestep: torch.Tensor | None = None
    cfg_split: bool = False


_STATE = _DenoiserState()


def as_timestep(value: object) -> torch.Tensor | None:
    """A denoiser's ``timestep`` argument as a float64 tensor of its first element (``None`` if absent)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[:1].to(torch.float64) if value.numel() else None
    return torch.tensor([float(value)], dtype=torch.float64)


def timestep_tensor() -> torch.Tensor | None:
    """The current timestep as a float64 tensor ``[1]`` (what quantized layers read), or ``None``."""
    return _STATE.timestep


def current_timestep() -> float | None:
    """The timestep value of the denoiser call in progress, or ``None`` outside one."""
    value = _STATE.timestep
    return None if value is None else float(value[0])


def set_timestep(value: object) -> None:
    """Set the current timestep (a number, a tensor whose first element is used, or ``None``)."""
    _STATE.timestep = as_timestep(value)


@contextmanager
def timestep(value: object) -> Iterator[None]:
    """Run a block with the current timestep set to ``value``."""
    before = _STATE.timestep
    set_timestep(value)
    try:
        yield
    finally:
        _STATE.timestep = before


def cfg_split_active() -> bool:
    """Whether the denoiser batch in progress is ``[unconditional half, conditional half]``."""
    return _STATE.cfg_split


def set_cfg_split(active: bool) -> None:
    _STATE.cfg_split = active
