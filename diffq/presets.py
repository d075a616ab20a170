"""Named recipes (`w8a8`, `w4a8`, ...) and the uniform plans they build.

A preset is a frozen :class:`Recipe`; :func:`register_preset` adds one. ``<preset>-rtn`` names
the plain baseline every better method is compared with: min-max scales, round-to-nearest
weights, and static per-tensor activation scales from a few calibration prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from diffq.convert import resolve_config
from diffq.errors import UnknownPresetError
from diffq.plan import LayerConfig, QuantPlan


@dataclass(frozen=True)
class Recipe:
    """A named way to quantize: the layer config every quantizable layer starts from."""

    name: str
    layer: LayerConfig
    description: str

    @property
    def needs_calibration(self) -> bool:
        return self.layer.a_bits is not None and self.layer.a_mode == "static"


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


def uniform_plan(
    recipe: Recipe, layers: dict[str, nn.Module], kept: dict[str, str], **overrides: object
) -> QuantPlan:
    """A plan giving every quantizable layer the recipe's config, fitted to the layer's shape."""
    base = replace(recipe.layer, **overrides) if overrides else recipe.layer
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
    # The default presets use the same recipe until timestep-aware calibration replaces it.
    register_preset(Recipe(_name, _config, _text))
