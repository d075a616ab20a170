"""Named recipes (`w8a8`, `w4a8`, ...) and the plans they build.

A preset is a frozen :class:`Recipe`; :func:`register_preset` adds one. The default presets are
*calibrated*: timestep-grouped activation scales where ranges drift, MSE-searched clipping,
smoothing, BOS-aware cross-attention and split scales for UNet skip concatenations, all chosen
per layer from the calibration statistics (:mod:`diffq.planning`). ``<preset>-rtn`` names the
plain baseline every better method is compared with: min-max scales, round-to-nearest weights,
and static per-tensor activation scales from a few calibration prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from diffq.calibration import CalibrationStats
from diffq.convert import resolve_config
from diffq.errors import UnknownPresetError
from diffq.plan import LayerConfig, QuantPlan
from diffq.planning import CalibrationOptions, calibrated_plan


@dataclass(frozen=True)
class Recipe:
    """A named way to quantize: the layer config every quantizable layer starts from."""

    name: str
    layer: LayerConfig
    description: str
    calibration: CalibrationOptions | None = None

    def needs_calibration(self, **overrides: object) -> bool:
        """Whether building the plan needs calibration statistics."""
        layer = replace(self.layer, **overrides) if overrides else self.layer
        return self.calibration is not None or layer.static_activations


PRESETS: dict[str, Recipe] = {}


def register_preset(recipe: Recipe) -> Recipe:
    """Add (or replace) a preset."""
    PRESETS[recipe.name] = recipe
    return recipe


def get_preset(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises an error that lists the valid ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UnknownPresetError(
            f"unknown preset {name!r}; valid presets: {', '.join(available_presets())}."
        ) from None


def available_presets() -> list[str]:
    return sorted(PRESETS)


def build_plan(
    recipe: Recipe,
    layers: dict[str, nn.Module],
    kept: dict[str, str],
    stats: CalibrationStats | None = None,
    splits: dict[str, int] | None = None,
    progress: bool = True,
    **overrides: object,
) -> QuantPlan:
    """The recipe's plan for these layers: uniform, or tuned per layer from ``stats``."""
    base = replace(recipe.layer, **overrides) if overrides else recipe.layer
    if recipe.calibration is not None:
        return calibrated_plan(recipe.name, base, recipe.calibration, layers, kept, stats, splits, progress)
    planned = {name: resolve_config(module, base) for name, module in layers.items()}
    return QuantPlan(preset=recipe.name, layers=planned, skipped=dict(kept))


_W8 = {"w_bits": 8, "w_group_size": None}
_W4 = {"w_bits": 4, "w_group_size": 64}

for _name, _weights, _acts, _what in (
    ("w8a8", _W8, {"a_bits": 8, "a_mode": "static"}, ("int8 per-channel", "int8 static per-tensor activations")),
    ("w4a8", _W4, {"a_bits": 8, "a_mode": "static"}, ("int4 group-64", "int8 static per-tensor activations")),
    ("w4a16", _W4, {"a_bits": None}, ("int4 group-64", "16-bit activations (weight-only)")),
    ("w8a16", _W8, {"a_bits": None}, ("int8 per-channel", "16-bit activations (weight-only)")),
):
    _config = LayerConfig(**_weights, **_acts)
    _text = f"{_what[0]} weights, {_what[1]}"
    register_preset(Recipe(f"{_name}-rtn", _config, f"baseline: {_text}, min-max round-to-nearest"))
    register_preset(Recipe(_name, _config, f"{_text}, timestep-aware calibration", CalibrationOptions()))

# 4-bit activations: static ranges cannot hold them, so scales are dynamic per token and group of 64.
_W4A4 = LayerConfig(w_bits=4, w_group_size=64, a_bits=4, a_mode="dynamic", a_group_size=64)
register_preset(
    Recipe("w4a4-rtn", _W4A4, "baseline: int4 group-64 weights, int4 dynamic per-token-group activations, min-max")
)
register_preset(
    Recipe(
        "w4a4",
        replace(_W4A4, rank=32),
        "int4 group-64 weights with a rank-32 16-bit low-rank branch (SVDQuant), smoothing, "
        "int4 dynamic per-token-group activations",
        CalibrationOptions(),
    )
)
