"""Errors a user can cause. Each message says what was wrong and what to do instead."""


class DiffQError(Exception):
    """Base class of every error diffq raises on purpose."""


class UnknownPresetError(DiffQError, ValueError):
    """A preset name that diffq does not know."""


class UnsupportedTargetError(DiffQError, TypeError):
    """Something `quantize` cannot work on: not a pipeline, pipeline class, model id or module."""


class QuantizationInputError(DiffQError, ValueError):
    """A tensor or setting handed to the quantizer math is unusable (NaN, inf, bad group size, ...)."""


class ModelLoadError(DiffQError, OSError):
    """A model could not be loaded: not bundled, not a local folder, and not downloadable."""


class CheckpointError(DiffQError, OSError):
    """A saved diffq checkpoint is missing pieces, truncated or does not match its model."""
