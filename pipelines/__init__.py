"""Everything that knows diffusers: adapters, loading, calibration runs, patching, checkpoints."""

from diffq.pipelines.adapters import (
    ADAPTERS,
    Adapter,
    adapter_for,
    denoiser_name,
    denoiser_of,
    register_adapter,
)

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "denoiser_name", "denoiser_of", "register_adapter"]
