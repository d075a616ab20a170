"""The plan a recipe builds for a model's layers: uniform, calibrated per layer, or mixed precision.

:func:`build_plan` is the entry: a uniform recipe gives every layer its config fitted to the
layer's shapes; a calibrated one decides per layer from the statistics (below); a mixed one
allocates bits by integer programming (:mod:`diffq.allocation`) on a sensitivity analysis and then
tunes each layer's chosen candidate the same way.

Per-layer decisions of a calibrated recipe, read from the calibration statistics:
For each quantizable layer: static activations get one scale per *timestep group* when their
range drifts across steps (``drift >= drift_threshold``), else one scale; convolutions fed by a
concatenation get a scale per part; cross-attention key/value projections with a constant BOS
first token compute it in full precision; linear layers and convolutions get a smoothing strength
searched on the sampled inputs. Clipping methods are recorded for :mod:`diffq.convert` to apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import nn
from tqdm.auto import tqdm

from diffq.allocation import LayerShape, allocate_bits
from diffq.calibration import CalibrationStats
from diffq.errors import QuantizationInputError
from diffq.layers import conv_channel_weight, layer_columns, resolve_config, supports_branch
from diffq.modules import weight_format
from diffq.offload import loaded
from diffq.plan import ClipMethod, LayerConfig, QuantPlan
from diffq.sensitivity import Candidate, Sensitivity, candidate_config
from diffq.smoothing import ALPHA_CANDIDATES, search_alpha

if TYPE_CHECKING:
    from diffq.presets import Recipe


@dataclass(frozen=True)
class CalibrationOptions:
    """How a calibrated recipe uses the statistics.

    Weights get MSE-searched clipping; static activation ranges default to the calibrated min-max
    (per timestep group): clipping searched on the small input sample over-clipped outliers that
    the sample missed (on ``digits-dit`` w4a8 lost about 3 dB PSNR with ``a_clip="mse"``, and
    gained nothing on ``digits-sd``), see benchmarks/RESULTS.md.
    """

    timestep_groups: int = 4
    drift_threshold: float = 1.5
    smoothing: bool = True
    alphas: tuple[float, ...] = ALPHA_CANDIDATES
    w_clip: ClipMethod = "mse"
    a_clip: ClipMethod = "minmax"
    bos: bool = True
    split_concat: bool = True


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is built from: the denoiser's quantizable layers, the layers it keeps in 16-bit
    (with the reason), its calibration statistics (``None`` for ``-rtn`` presets), and the channel
    where each UNet skip concatenation's second part starts."""

    layers: dict[str, nn.Module]
    kept: dict[str, str] = field(default_factory=dict)
    stats: CalibrationStats | None = None
    splits: dict[str, int] = field(default_factory=dict)


def plan_layer(
    name: str,
    module: nn.Module,
    config: LayerConfig,
    options: CalibrationOptions,
    stats: CalibrationStats,
    split: int | None = None,
) -> LayerConfig:
    """The calibrated config of one layer (``config`` already fitted to the layer's shape)."""
    changes: dict = {"w_clip": options.w_clip}
    if config.static_activations:
        changes["a_clip"] = options.a_clip
        steps = [t for t in stats.timesteps(name) if t >= 0]
        if len(steps) > 1 and stats.drift(name) >= options.drift_threshold:
            changes["a_groups"] = min(options.timestep_groups, len(steps))
    if isinstance(module, nn.Conv2d) and split and options.split_concat and config.a_bits is not None:
        changes["a_split"] = split
    if isinstance(module, nn.Linear) and options.bos and name in stats.bos:
        changes["bos"] = True
    rows = stats.sample(name)
    if supports_branch(module) and options.smoothing and rows is not None and rows.shape[0] >= 8:
        linear = isinstance(module, nn.Linear)
        device = module.weight.device  # the statistics are on the CPU; the weight may be on a GPU
        # A convolution is searched as the Linear map of each kernel tap (its weight as [out × taps, in]),
        # without the low-rank branch, whose SVD is of the [out, in × taps] weight.
        changes["smooth_alpha"] = search_alpha(
            rows.to(device),
            module.weight.detach() if linear else conv_channel_weight(module),
            weight_format(config),
            config.a_bits,
            stats.channel_absmax(name).to(device),
            dynamic=config.a_mode == "dynamic",
            candidates=options.alphas,
            rank=config.rank if linear else 0,
            a_group_size=config.a_group_size,
        )
    return replace(config, **changes)


def plan_candidate(
    name: str,
    module: nn.Module,
    candidate: Candidate,
    options: CalibrationOptions,
    stats: CalibrationStats,
    split: int | None = None,
) -> LayerConfig:
    """The calibrated config of one layer given a mixed-precision candidate (its bits and rank)."""
    return plan_layer(name, module, resolve_config(module, candidate_config(candidate)), options, stats, split)


def calibrated_plan(
    preset: str, base: LayerConfig, options: CalibrationOptions, inputs: PlanInputs, progress: bool = True
) -> QuantPlan:
    """A plan whose layers start from ``base`` and are tuned from ``inputs.stats``."""
    stats = inputs.stats
    if stats is None:
        raise QuantizationInputError(
            f"preset {preset!r} is calibrated: pass calibration statistics (diffq.calibrate) or use {preset}-rtn."
        )
    planned = {}
    for name, module in tqdm(inputs.layers.items(), desc="diffq: planning layers", disable=not progress):
        with loaded(module):  # a layer whose weights are on disk (diffq.offload) is read for this
            planned[name] = plan_layer(name, module, resolve_config(module, base), options, stats,
                                       inputs.splits.get(name))
    return QuantPlan(preset=preset, layers=planned, skipped=dict(inputs.kept))


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


def with_temporal_layers(plan: QuantPlan, temporal: dict[str, nn.Module], config: LayerConfig) -> QuantPlan:
    """``plan`` with the ``temporal`` layers, which it keeps in 16-bit, quantized with ``config``
    (:func:`temporal_config`) instead. A mixed-precision budget covers the layers the integer program
    allocates, not these."""
    added = {name: resolve_config(module, config) for name, module in temporal.items()}
    skipped = {name: reason for name, reason in plan.skipped.items() if name not in added}
    return replace(plan, layers={**plan.layers, **added}, skipped=skipped)
