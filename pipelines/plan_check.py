"""Score whole plans end to end: the final images of the quantized pipeline against full precision.

The integer program adds up per-layer sensitivities, each measured with one layer quantized
alone. That sum is only a model of what the layers do together, and it can mislead: measured on
a few prompts, some layers look cheaper at 3 bits than they are, and the program spends exactly
those. On the bundled DiT the plan it solves for at 4.0 average bits is worse than uniform w4a8
(benchmarks/RESULTS.md). :func:`compare_plans` measures what each plan really gives on the
calibration prompts, so mixed precision can keep its plan only where it beats the uniform one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats
from diffq.convert import convert_model
from diffq.errors import QuantizationInputError
from diffq.pipelines.adapters import denoiser_of
from diffq.pipelines.calibrate import default_call_kwargs
from diffq.pipelines.patching import install_timestep_hook
from diffq.pipelines.sensitivity import final_images
from diffq.plan import QuantPlan
from diffq.planning import PlanInputs, uniform_alternative
from diffq.presets import Recipe
from diffq.scores import PSNR_CAP_DB, psnr
from diffq.sensitivity import Sensitivity

MAX_PSNR_DB = PSNR_CAP_DB  # identical images


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of ``images`` against ``reference``, both in [0, 1], from the pooled mean squared error;
    a plan that produced NaN or inf images scores ``-inf`` (the worst, not a perfect match)."""
    return psnr(images, reference)


def compare_plans(
    pipe: Any,
    plans: Mapping[str, QuantPlan],
    stats: CalibrationStats | None,
    prompts: Sequence[str],
    num_inference_steps: int = 8,
    seed: int = 0,
    progress: bool = True,
    **call_kwargs: Any,
) -> dict[str, float]:
    """PSNR (dB) of each plan's final images against the float pipeline's, on the same prompts and
    seeds. Each plan's layers are swapped in, scored and swapped back, so the denoiser is left float
    (conversion proper is :func:`diffq.convert`'s)."""
    if not prompts:
        raise QuantizationInputError("checking a plan needs at least one prompt.")
    denoiser = denoiser_of(pipe)
    install_timestep_hook(denoiser)
    call_kwargs = {**default_call_kwargs(pipe), **call_kwargs}
    names = {name for plan in plans.values() for name in plan.layers}
    originals = {name: denoiser.get_submodule(name) for name in names}
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    scores: dict[str, float] = {}
    try:
        reference = final_images(pipe, prompts, num_inference_steps, seed, call_kwargs)
        for label, plan in tqdm(plans.items(), desc="diffq: checking plans", disable=not progress):
            try:
                convert_model(denoiser, plan, stats, progress=False)
                scores[label] = psnr_db(final_images(pipe, prompts, num_inference_steps, seed, call_kwargs), reference)
            finally:
                for name, module in originals.items():
                    denoiser.set_submodule(name, module)
    finally:
        pipe._progress_bar_config = saved_bar
    return scores


class PlanCheckWarning(UserWarning):
    """Mixed precision kept the uniform plan because its own plan did worse end to end."""


def keep_better_than_uniform(
    pipe: Any,
    recipe: Recipe,
    plan: QuantPlan,
    inputs: PlanInputs,
    sensitivity: Sensitivity,
    budget: float | None,
    prompts: Sequence[str],
    num_inference_steps: int = 8,
    progress: bool = True,
    **call_kwargs: Any,
) -> tuple[QuantPlan, dict[str, float]]:
    """``(plan, scores)``: the mixed ``plan``, or the uniform plan within the same budget when that
    one's final images are closer to full precision on ``prompts``, and the PSNR of each (``{}`` when
    no uniform candidate fits the budget). The returned plan's ``note`` records both scores; the
    denoiser is left float.
    """
    alternative = uniform_alternative(recipe, inputs, sensitivity, budget, planned=plan)
    if alternative is None:  # no uniform candidate fits the budget: nothing to compare with
        return plan, {}
    candidate, uniform = alternative
    # Mixed first: it is the one kept on a tie.
    scores = compare_plans(pipe, {"mixed": plan, "uniform": uniform}, inputs.stats, prompts, num_inference_steps,
                           progress=progress, **call_kwargs)
    measured = (f"{scores['mixed']:.2f} dB for the mixed plan, {scores['uniform']:.2f} dB for uniform "
                f"{candidate.label} (final images against full precision, {len(prompts)} calibration "
                f"prompt(s), {num_inference_steps} steps)")
    if scores["mixed"] >= scores["uniform"]:
        return replace(plan, note=f"mixed plan kept: {measured}"), scores
    note = f"uniform {candidate.label} kept, it fits the budget and beat the mixed plan end to end: {measured}"
    warnings.warn(f"diffq: {note}. Pass check=False to keep the mixed plan anyway.", PlanCheckWarning, stacklevel=3)
    return replace(uniform, note=note), scores
