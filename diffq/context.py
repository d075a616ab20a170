"""What the denoiser is doing now, visible to quantized layers and to calibration.

A pre-forward hook on the denoiser (installed by :mod:`diffq.pipelines.patching`) sets the
current timestep from the denoiser's ``timestep`` argument; layers read it to pick a
step-dependent activation scale, and calibration reads it to file statistics per step. During
calibration the pipeline runner also says whether the batch is ``[unconditional, conditional]``
(classifier-free guidance), so statistics can be kept per half.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_TIMESTEP: ContextVar[float | None] = ContextVar("diffq_timestep", default=None)
_CFG_SPLIT: ContextVar[bool] = ContextVar("diffq_cfg_split", default=False)


def current_timestep() -> float | None:
    """The timestep value of the denoiser call in progress, or ``None`` outside one."""
    return _TIMESTEP.get()


def set_timestep(value: float | None) -> None:
    """Set the current timestep (called by the denoiser's pre-forward hook)."""
    _TIMESTEP.set(value)


@contextmanager
def timestep(value: float | None) -> Iterator[None]:
    """Run a block with the current timestep set to ``value``."""
    token = _TIMESTEP.set(value)
    try:
        yield
    finally:
        _TIMESTEP.reset(token)


def cfg_split_active() -> bool:
    """Whether the denoiser batch in progress is ``[unconditional half, conditional half]``."""
    return _CFG_SPLIT.get()


def set_cfg_split(active: bool) -> None:
    _CFG_SPLIT.set(active)
