"""Named recipes (`w8a8`, `w4a8`, ...) and the plans they build.

A preset is a frozen :class:`Recipe`; :func:`register_preset` adds one. The default presets are
*calibrated*: timestep-grouped activation scales where ranges drift, MSE-searched clipping,
smoothing, BOS-aware cross-attention and split scales for UNet skip concatenations, all chosen
per layer from the calibration statistics (:mod:`diffq.planning`). ``<preset>-rtn`` names the
plain baseline every better method is compared with: min-max scales, round-to-nearest weights,
and static per-tensor activation scales from a few calibration prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn
from tqdm.auto import tqdm

from diffq.allocation import LayerShape, allocate_bits
from diffq.errors import QuantizationInputError, UnknownPresetError
from diffq.layers import layer_columns, resolve_config, supports_branch
from diffq.plan import LayerConfig, QuantPlan
from diffq.planning import CalibrationOptions, PlanInputs, calibrated_plan, plan_candidate
from diffq.sensitivity import Candidate, Sensitivity, default_candidates


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
        return self.calibration is not None or layer.static_activations


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


def get_preset(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises an error that lists the valid ones.

    Besides the registered presets, ``w<bits>a<4|8>`` with bits that no uniform preset has (such as
    ``w3.5a8`` or ``w5a8``) names mixed precision at that average weight-bit budget.
    """
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


def layer_shape(module: nn.Module) -> LayerShape:
    return LayerShape(layer_columns(module), module.weight.shape[0], supports_branch(module))


def measured_candidates(
    sensitivity: Sensitivity, shapes: dict[str, LayerShape], allowed: tuple[Candidate, ...]
) -> list[Candidate]:
    """The recipe's candidates that the sensitivity analysis measured on every layer they apply to."""
    usable = [
        c for c in allowed
        if all(c.label in sensitivity.scores.get(n, {}) for n, shape in shapes.items() if shape.allows(c))
    ]
    if not usable:
        measured = sorted({label for scores in sensitivity.scores.values() for label in scores})
        raise QuantizationInputError(
            f"the sensitivity analysis measured {measured or 'nothing'} but the preset chooses among "
            f"{[c.label for c in allowed]}; measure those candidates (diffq.sensitivity) for every layer."
        )
    return usable


def mixed_plan(
    recipe: Recipe,
    inputs: PlanInputs,
    sensitivity: Sensitivity | None,
    budget: float | None,
    progress: bool = True,
    content_share: float | None = None,
) -> QuantPlan:
    """Allocate bits by integer programming, then tune each layer's config from ``inputs.stats``.

    ``content_share``: split the budget between the metric groups (MixDQ) instead of one joint program.
    """
    budget = budget if budget is not None else recipe.budget
    if budget is None:
        raise QuantizationInputError(f"preset {recipe.name!r} needs a budget, e.g. budget=4.0 average weight bits.")
    if inputs.stats is None or sensitivity is None:
        raise QuantizationInputError(
            f"mixed precision needs calibration statistics and a sensitivity analysis (diffq.calibrate, "
            f"diffq.sensitivity) for preset {recipe.name!r}."
        )
    shapes = {n: layer_shape(m) for n, m in inputs.layers.items()}
    candidates = measured_candidates(sensitivity, shapes, recipe.candidates)
    allocation = allocate_bits(sensitivity, shapes, candidates, budget, content_share=content_share)
    return _plan_choices(recipe, inputs, allocation.choice, progress)


def uniform_alternative(
    recipe: Recipe,
    inputs: PlanInputs,
    sensitivity: Sensitivity,
    budget: float | None,
    planned: QuantPlan | None = None,
) -> tuple[Candidate, QuantPlan] | None:
    """The uniform plan a mixed recipe's integer program could also have chosen: the candidate
    without a low-rank branch that the analysis measured, fits ``budget`` and has the most weight
    bits (then activation bits), given to every layer. ``None`` when no such candidate fits.

    ``planned``: a plan of the same recipe and statistics (the mixed one) whose layers that got
    this candidate are reused rather than tuned again."""
    budget = budget if budget is not None else recipe.budget
    if budget is None:
        return None
    shapes = {n: layer_shape(m) for n, m in inputs.layers.items()}
    fitting = [
        c for c in measured_candidates(sensitivity, shapes, recipe.candidates) if c.rank == 0 and c.w_bits <= budget + 1e-9
    ]
    if not fitting:
        return None
    best = max(fitting, key=lambda c: (c.w_bits, c.a_bits or 16))
    reuse = {
        name: config for name, config in (planned.layers.items() if planned is not None else ())
        if (config.w_bits, config.a_bits, config.rank) == (best.w_bits, best.a_bits, best.rank)
    }
    return best, _plan_choices(recipe, inputs, dict.fromkeys(inputs.layers, best), False, reuse)


def _plan_choices(
    recipe: Recipe,
    inputs: PlanInputs,
    choice: dict[str, Candidate],
    progress: bool,
    reuse: dict[str, LayerConfig] | None = None,
) -> QuantPlan:
    """A plan with each layer's chosen candidate, tuned from ``inputs.stats`` like the calibrated
    presets; layers in ``reuse`` keep the config given there (already tuned for the same candidate)."""
    options = recipe.calibration or CalibrationOptions()
    reuse = reuse or {}
    planned = {}
    for name, module in tqdm(inputs.layers.items(), desc="diffq: planning layers", disable=not progress):
        if name in reuse:
            planned[name] = reuse[name]
            continue
        planned[name] = plan_candidate(name, module, choice[name], options, inputs.stats, inputs.splits.get(name))
    return QuantPlan(preset=recipe.name, layers=planned, skipped=dict(inputs.kept))


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


def with_temporal_layers(plan: QuantPlan, temporal: dict[str, nn.Module], config: LayerConfig) -> QuantPlan:
    """``plan`` with the ``temporal`` layers, which it keeps in 16-bit, quantized with ``config``
    (:func:`temporal_config`) instead. A mixed-precision budget covers the layers the integer program
    allocates, not these."""
    added = {name: resolve_config(module, config) for name, module in temporal.items()}
    skipped = {name: reason for name, reason in plan.skipped.items() if name not in added}
    return replace(plan, layers={**plan.layers, **added}, skipped=skipped)


def build_plan(
    recipe: Recipe,
    inputs: PlanInputs,
    progress: bool = True,
    sensitivity: Sensitivity | None = None,
    budget: float | None = None,
    content_share: float | None = None,
    **overrides: object,
) -> QuantPlan:
    """The recipe's plan for ``inputs.layers``: uniform, tuned per layer from the statistics, or mixed."""
    if recipe.is_mixed:
        if overrides:
            raise QuantizationInputError(
                f"mixed precision chooses bits, ranks and activations per layer; drop {sorted(overrides)}."
            )
        return mixed_plan(recipe, inputs, sensitivity, budget, progress, content_share)
    if budget is not None or content_share is not None:
        what = "budget=" if budget is not None else "content_share="
        raise QuantizationInputError(f"preset {recipe.name!r} is uniform; {what} needs 'mixed' or e.g. 'w3.5a8'.")
    base = replace(recipe.layer, **overrides) if overrides else recipe.layer
    if recipe.calibration is not None:
        return calibrated_plan(recipe.name, base, recipe.calibration, inputs, progress)
    planned = {name: resolve_config(module, base) for name, module in inputs.layers.items()}
    return QuantPlan(preset=recipe.name, layers=planned, skipped=dict(inputs.kept))


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

register_preset(mixed_recipe(4.0, (4, 8), name="mixed"))
