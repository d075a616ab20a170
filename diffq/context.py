"""The denoising step that is running now, visible to quantized layers.

A pre-forward hook on the denoiser (installed by :mod:`diffq.pipelines.patching`) sets the
current timestep from the denoiser's ``timestep`` argument; layers read it to pick a
step-dependent activation scale, and calibration reads it to file statistics per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_TIMESTEP: ContextVar[float | None] = ContextVar("diffq_timestep", default=None)


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
