"""Per-layer decisions of a calibrated recipe, read from the calibration statistics.

For each quantizable layer: static activations get one scale per *timestep group* when their
range drifts across steps (``drift >= drift_threshold``), else one scale; convolutions fed by a
concatenation get a scale per part; cross-attention key/value projections with a constant BOS
first token compute it in full precision; linear layers and convolutions get a smoothing strength
searched on the sampled inputs. Clipping methods are recorded for :mod:`diffq.convert` to apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats
from diffq.errors import QuantizationInputError
from diffq.layers import conv_channel_weight, resolve_config, supports_branch
from diffq.modules import weight_format
from diffq.plan import ClipMethod, LayerConfig, QuantPlan
from diffq.sensitivity import Candidate, candidate_config
from diffq.smoothing import ALPHA_CANDIDATES, search_alpha


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
        # A convolution is searched as the Linear map of each kernel tap (its weight as [out × taps, in]),
        # without the low-rank branch, whose SVD is of the [out, in × taps] weight.
        changes["smooth_alpha"] = search_alpha(
            rows,
            module.weight.detach() if linear else conv_channel_weight(module),
            weight_format(config),
            config.a_bits,
            stats.channel_absmax(name),
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
        planned[name] = plan_layer(name, module, resolve_config(module, base), options, stats, inputs.splits.get(name))
    return QuantPlan(preset=preset, layers=planned, skipped=dict(inputs.kept))
