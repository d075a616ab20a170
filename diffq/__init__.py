"""diffq: quantize diffusers pipelines to W8A8, W4A8, W4A16 and more, and run them.

    >>> import diffq
    >>> pipe = diffq.quantize("digits-sd", "w4a8")
    >>> image = pipe("a handwritten digit 7").images[0]
"""

from diffq.api import allocate, calibrate, convert, load, quantize, save, sensitivity, weight_bytes
from diffq.calibration import CalibrationStats
from diffq.errors import (
    CheckpointError,
    DiffQError,
    ModelLoadError,
    QuantizationInputError,
    UnknownPresetError,
    UnsupportedTargetError,
)
from diffq.formats import IntFormat
from diffq.modules import QuantizedConv2d, QuantizedLinear
from diffq.pipelines.backend import DiffQConfig
from diffq.pipelines.backend import register as _register_diffusers_backend
from diffq.pipelines.plan_check import PlanCheckWarning
from diffq.plan import LayerConfig, QuantPlan
from diffq.presets import PRESETS, Recipe, available_presets, get_preset, register_preset
from diffq.sensitivity import Candidate, Sensitivity

_register_diffusers_backend()  # plain diffusers `from_pretrained` now loads diffq checkpoints

__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "CheckpointError",
    "DiffQConfig",
    "DiffQError",
    "IntFormat",
    "LayerConfig",
    "ModelLoadError",
    "PRESETS",
    "PlanCheckWarning",
    "QuantPlan",
    "QuantizationInputError",
    "QuantizedConv2d",
    "QuantizedLinear",
    "Recipe",
    "UnknownPresetError",
    "UnsupportedTargetError",
    "allocate",
    "available_presets",
    "Candidate",
    "Sensitivity",
    "calibrate",
    "sensitivity",
    "convert",
    "get_preset",
    "load",
    "quantize",
    "register_preset",
    "save",
    "weight_bytes",
]
