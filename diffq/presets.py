"""Named recipes (`w8a8`, `w4a8`, ...): what each preset quantizes and how.

A preset is a frozen :class:`Recipe`; :func:`register_preset` adds one; the plans a recipe builds
come from :mod:`diffq.planning`. The default presets are
*calibrated*: timestep-grouped activation scales where ranges drift, MSE-searched clipping,
smoothing, BOS-aware cross-attention and split scales for UNet skip concatenations, all chosen
per layer from the calibration statistics (:mod:`diffq.planning`). ``<preset>-rtn`` names the
plain baseline every better method is compared with: min-max scales, round-to-nearest weights,
and static per-tensor activation scales from a few calibration prompts. The calibrated 4-bit-weight
presets (``w4a8``, ``w4a16``, ``w4a4``) round their weights by GPTQ (:mod:`diffq.gptq`), which gained
1.3–4.7 dB on both bundled models; the 8-bit ones round to nearest, where GPTQ was within ±0.25 dB
(benchmarks/RESULTS.md, "GPTQ weight rounding").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from diffq.errors import QuantizationInputError, UnknownPresetError
from diffq.plan import LayerConfig
from diffq.planning import CalibrationOptions
from diffq.sensitivity import Candidate, default_candidates


@dataclass(frozen=True)
class Recipe:
    """A named way to quantize: the layer config every quantizable layer starts from."""

    name: str
    layer: LayerConfig
    description: str
    calibration: CalibrationOptions | None = None
    candidates: tuple[Candidate, ...] = ()  # mixed precision: what each layer may get
    budget: float | None = None  # mixed precision: average weight bits

    @property
    def is_mixed(self) -> bool:
        return bool(self.candidates)

    def needs_calibration(self, **overrides: object) -> bool:
        """Whether building the plan needs calibration statistics."""
        layer = replace(self.layer, **overrides) if overrides else self.layer
        return self.calibration is not None or layer.static_activations or layer.w_round == "gptq"


PRESETS: dict[str, Recipe] = {}


def register_preset(recipe: Recipe) -> Recipe:
    """Add (or replace) a preset."""
    PRESETS[recipe.name] = recipe
    return recipe


MIXED_BUDGET = re.compile(r"w(\d+(?:\.\d+)?)a(4|8)")


def mixed_recipe(budget: float, a_bits: tuple[int, ...] = (4, 8), name: str | None = None) -> Recipe:
    """Mixed precision: every layer picks weight bits {2, 3, 4, 8} (± low-rank branch) and activation
    bits among ``a_bits`` by integer programming on its sensitivity, averaging ``budget`` weight bits."""
    label = name or f"w{budget:g}a{a_bits[0] if len(a_bits) == 1 else 'x'}"
    return Recipe(
        label,
        LayerConfig(w_bits=4, w_group_size=64, a_bits=max(a_bits)),
        f"mixed precision at {budget:g} average weight bits, activations {'/'.join(map(str, a_bits))}-bit",
        CalibrationOptions(),
        candidates=tuple(default_candidates(a_bits=a_bits)),
        budget=budget,
    )


def get_preset(name: str | Recipe) -> Recipe:
    """The recipe called ``name``; an unknown name raises an error that lists the valid ones.

    Besides the registered presets, ``w<bits>a<4|8>`` with bits that no uniform preset has (such as
    ``w3.5a8`` or ``w5a8``) names mixed precision at that average weight-bit budget.
    """
    if isinstance(name, Recipe):
        return name
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    match = MIXED_BUDGET.fullmatch(name) if isinstance(name, str) else None
    if match:
        return mixed_recipe(float(match[1]), (int(match[2]),), name=name)
    raise UnknownPresetError(
        f"unknown preset {name!r}; valid presets: {', '.join(available_presets())}, or a mixed-precision "
        "budget such as 'w3.5a8' ('mixed' with budget=...)."
    )


def available_presets() -> list[str]:
    return sorted(PRESETS)


TEMPORAL_BITS = (4, 8)


def weight_only_config(w_bits: int, w_group_size: int | None) -> LayerConfig:
    """Weight-only quantization (16-bit activations) with MSE-searched weight ranges: for layers whose
    inputs are not worth quantizing, such as text encoders' and the temporal modulation layers."""
    return LayerConfig(w_bits=w_bits, w_group_size=w_group_size, a_bits=None, w_clip="mse")


def temporal_config(bits: int) -> LayerConfig:
    """The weight-only config of the temporal modulation layers at ``temporal_bits=bits``: 8 bits per
    output channel, or 4 in groups of 64.

    These layers (AdaLN modulation, ResNet time projections) read the timestep embedding, one vector
    per image rather than a token sequence, so their activations stay 16-bit and only their weights,
    which are large in AdaLN models such as Flux, shrink.
    """
    if bits not in TEMPORAL_BITS:
        raise QuantizationInputError(
            f"temporal_bits={bits!r}; use 8 (per channel) or 4 (groups of 64), or None to keep those layers 16-bit."
        )
    return weight_only_config(bits, None if bits == 8 else 64)


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
    _rounding = "GPTQ-rounded" if _weights is _W4 else "round-to-nearest"
    register_preset(Recipe(_name, replace(_config, w_round="gptq") if _weights is _W4 else _config,
                           f"{_text}, {_rounding}, timestep-aware calibration", CalibrationOptions()))

# 4-bit activations: static ranges cannot hold them, so scales are dynamic per token and group of 64.
_W4A4 = LayerConfig(w_bits=4, w_group_size=64, a_bits=4, a_mode="dynamic", a_group_size=64)
register_preset(
    Recipe("w4a4-rtn", _W4A4, "baseline: int4 group-64 weights, int4 dynamic per-token-group activations, min-max")
)
register_preset(
    Recipe(
        "w4a4",
        replace(_W4A4, rank=32, w_round="gptq"),
        "int4 group-64 GPTQ-rounded weights with a rank-32 16-bit low-rank branch (SVDQuant), smoothing, "
        "int4 dynamic per-token-group activations",
        CalibrationOptions(),
    )
)

register_preset(mixed_recipe(4.0, (4, 8), name="mixed"))
