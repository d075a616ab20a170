"""Measure each layer's sensitivity by quantizing it alone, candidate by candidate.

A reference run of the float pipeline records the final images and every denoiser call (its
inputs and output). Then, for each layer and candidate, the layer is swapped for its quantized
twin and scored with its group's metric:

* content layers: SSIM of the final images (the whole pipeline runs again, same seeds);
* quality layers: SQNR (dB) of the denoiser output over the recorded calls, replayed with the
  float inputs, so the score is the layer's own error and not a drifted trajectory;
* or, with ``metric="image"``, every layer: PSNR (dB) of the final images.

Results are saved after every layer, so an interrupted analysis resumes. ``shard=(i, n)`` measures
every n-th layer starting at i, so n processes (``accelerate launch``) split the work.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import CalibrationStats
from diffq.convert import convert_model
from diffq.errors import QuantizationInputError
from diffq.layers import supports_branch
from diffq.pipelines.adapters import adapter_for, denoiser_of
from diffq.pipelines.calibrate import conditioning, default_call_kwargs
from diffq.pipelines.patching import install_timestep_hook
from diffq.plan import QuantPlan
from diffq.planning import CalibrationOptions, plan_candidate
from diffq.saving import check_file_target
from diffq.scores import psnr
from diffq.sensitivity import Candidate, Sensitivity, SensitivityMetric, check_metric, is_sensitivity_file

MAX_SQNR_DB = 200.0  # a layer whose error is exactly zero
# Bumped when diffq changes how a candidate is quantized, so analyses cached before are measured again
# (2: convolutions got smoothing, the low-rank branch and grouped 4-bit activations).
QUANTIZER_REVISION = 2


def fingerprint(pipe: Any, layers: Sequence[str], candidates: Sequence[Candidate], prompts: Sequence[str],
                num_inference_steps: int, seed: int, call_kwargs: dict,
                options: CalibrationOptions | None = None, metric: SensitivityMetric = "decoupled") -> str:
    """A stable id of what a sensitivity analysis measured (model, layers, candidates, settings,
    the calibrated recipe each candidate is built with, and the metric)."""
    source = str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    measured = [source, sorted(layers), [c.label for c in candidates], list(prompts), num_inference_steps, seed,
                {k: repr(v) for k, v in sorted(call_kwargs.items())}, repr(options or CalibrationOptions()),
                QUANTIZER_REVISION]
    if metric != "decoupled":  # the default metric keeps the ids analyses were cached under before
        measured.append(metric)
    payload = json.dumps(measured)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


@torch.no_grad()
def final_images(pipe: Any, prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict) -> torch.Tensor:
    """The pipeline's images for ``prompts`` (prompt i with seed ``seed + i``), float in [0, 1]."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(**conditioning(pipe, list(prompts)), num_inference_steps=steps, generator=generators,
               output_type="pt", **call_kwargs)
    images = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)
    return images.float().clamp(0, 1)


class _Reference:
    """The float run: final images and every denoiser call with its output."""

    def __init__(self, pipe: Any, prompts: Sequence[str], steps: int, seed: int, call_kwargs: dict) -> None:
        self.pipe, self.prompts, self.steps, self.seed, self.call_kwargs = pipe, list(prompts), steps, seed, call_kwargs
        denoiser = denoiser_of(pipe)
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        pending: list[tuple[tuple, dict]] = []

        def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append((_clone(args), _clone(kwargs)))

        def after(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            args, kwargs = pending.pop()
            self.calls.append((args, kwargs, _first_tensor(output).detach().clone()))

        handles = [
            denoiser.register_forward_pre_hook(before, with_kwargs=True),
            denoiser.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            self.images = self.generate()
        finally:
            for handle in handles:
                handle.remove()

    def generate(self) -> torch.Tensor:
        return final_images(self.pipe, self.prompts, self.steps, self.seed, self.call_kwargs)

    @torch.no_grad()
    def sqnr(self, denoiser: nn.Module) -> float:
        signal = noise = 0.0
        for args, kwargs, expected in self.calls:
            got = _first_tensor(denoiser(*args, **kwargs)).float()
            signal += float(expected.float().pow(2).sum())
            noise += float((got - expected.float()).pow(2).sum())
        if noise == 0:
            return MAX_SQNR_DB
        return min(MAX_SQNR_DB, 10 * math.log10(max(signal, 1e-30) / noise))

    def ssim(self) -> float:
        from torchmetrics.functional.image import structural_similarity_index_measure

        images = self.generate()
        # SSIM is at most 1; float32 rounding can put identical images one ulp above it.
        return min(1.0, float(structural_similarity_index_measure(images, self.images, data_range=1.0)))

    def psnr(self) -> float:
        """PSNR (dB) of the final images against the float ones (images in [0, 1])."""
        return psnr(self.generate(), self.images, cap=MAX_SQNR_DB)


def measure_sensitivity(
    pipe: Any,
    layers: dict[str, nn.Module],
    candidates: Sequence[Candidate],
    stats: CalibrationStats,
    prompts: Sequence[str],
    num_inference_steps: int = 8,
    seed: int = 0,
    options: CalibrationOptions | None = None,
    cache: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    metric: SensitivityMetric = "decoupled",
    overwrite: bool = False,
    **call_kwargs: Any,
) -> Sensitivity:
    """Score every (layer, candidate) of ``layers`` in this shard; resumes from ``cache``."""
    check_metric(metric)
    if cache is not None:
        check_file_target(cache, overwrite=overwrite, replaceable=is_sensitivity_file)  # before any work
    if not prompts:
        raise QuantizationInputError("sensitivity analysis needs at least one prompt.")
    index, count = shard
    if not 0 <= index < count:
        raise QuantizationInputError(f"bad shard {shard}; expected (index, count) with 0 <= index < count.")
    denoiser = denoiser_of(pipe)
    adapter = adapter_for(denoiser)
    install_timestep_hook(denoiser)
    options = options or CalibrationOptions()
    call_kwargs = {**default_call_kwargs(pipe), **call_kwargs}
    splits = adapter.concat_splits(denoiser)
    names = sorted(layers)
    key = fingerprint(pipe, names, candidates, prompts, num_inference_steps, seed, call_kwargs, options, metric)
    result = Sensitivity(key, metric=metric)
    if cache is not None and is_sensitivity_file(Path(cache)):
        cached = Sensitivity.load(cache)
        if cached.fingerprint == key and cached.metric == metric:
            result = cached
    result.groups.update({n: adapter.group_of(n) for n in names})
    mine = [n for i, n in enumerate(names) if i % count == index]

    def pending_of(name: str) -> list[Candidate]:
        # The low-rank branch exists on Linear and groups=1 Conv2d layers; others skip those candidates.
        allowed = [c for c in candidates if c.rank == 0 or supports_branch(layers[name])]
        return [c for c in allowed if c.label not in result.scores.get(name, {})]

    todo = [(n, c) for n in mine for c in pending_of(n)]
    if not todo:
        return result

    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        reference = _Reference(pipe, prompts, num_inference_steps, seed, call_kwargs)
        bar = tqdm(total=len(todo), desc="diffq: sensitivity", disable=not progress)
        for name in mine:
            pending = pending_of(name)
            if not pending:
                continue
            original = layers[name]
            for candidate in pending:
                config = plan_candidate(name, original, candidate, options, stats, splits.get(name))
                convert_model(denoiser, QuantPlan("probe", {name: config}), stats, progress=False)
                try:
                    if metric == "image":
                        score = reference.psnr()
                    else:
                        score = reference.ssim() if result.groups[name] == "content" else reference.sqnr(denoiser)
                finally:
                    denoiser.set_submodule(name, original)
                result.scores.setdefault(name, {})[candidate.label] = score
                bar.update(1)
            if cache is not None:
                result.save(cache, overwrite=overwrite)
        bar.close()
    finally:
        pipe._progress_bar_config = saved_bar
    return result
