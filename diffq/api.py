"""The public verbs: ``quantize`` composes ``calibrate`` → ``allocate`` → ``convert``; ``load`` reads."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import ActivationObserver, CalibrationStats
from diffq.convert import convert_model
from diffq.errors import QuantizationInputError, UnsupportedTargetError
from diffq.layers import resolve_config
from diffq.memory import available_memory
from diffq.modules import QUANTIZED_MODULES
from diffq.offload import Offloaded, safetensors_index
from diffq.pipelines.adapters import Adapter, adapter_for, denoiser_name, denoiser_of
from diffq.pipelines.calibrate import calibrate_pipeline, default_prompts
from diffq.pipelines.loading import default_checkpoint, denoiser_weight_files, load_pipeline, resolve_model
from diffq.pipelines.managed import manage
from diffq.pipelines.patching import install_timestep_hook
from diffq.pipelines.plan_check import keep_better_than_uniform
from diffq.pipelines.sensitivity import fingerprint, measure_sensitivity
from diffq.pipelines.serialization import (
    attach_plan,
    load_quantized_pipeline,
    quantized_component,
    save_quantized,
)
from diffq.pipelines.single_file import single_file_kwargs
from diffq.plan import LayerConfig, QuantPlan
from diffq.planning import PlanInputs, build_plan, with_temporal_layers
from diffq.presets import Recipe, get_preset, temporal_config, weight_only_config
from diffq.selection import LayerSelection, Patterns
from diffq.sensitivity import Candidate, Sensitivity, SensitivityMetric, check_metric, default_candidates
from diffq.validation import finite_number, mapping, of_type, path_like, whole_number

GENERIC = Adapter(
    name="generic",
    denoiser_classes=(),
    keep_full_precision={},
    content_patterns=(),
    notes="Any other nn.Module: every Linear and Conv2d is quantized.",
)


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _adapter(model: nn.Module, bare: bool) -> Adapter:
    if bare:
        try:
            return adapter_for(model)
        except UnsupportedTargetError:
            return GENERIC
    return adapter_for(model)


def load(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load a pipeline: a bundled name (``digits-sd``), a local folder (float or diffq-quantized) or a Hub id."""
    location, is_local = resolve_model(path_like(name_or_path, "the model to load"))
    if is_local:
        from pathlib import Path

        if quantized_component(Path(location)) is not None:
            return load_quantized_pipeline(location, **kwargs)
    return manage(load_pipeline(location, **kwargs))


def save(pipe: Any, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a (quantized) pipeline as a diffusers folder that :func:`load` reads back.

    ``directory`` may be new, empty, or an earlier diffq checkpoint (replaced atomically; other files
    in it are kept). An existing file or a folder with other contents is refused unless
    ``overwrite=True``; the folder the pipeline was loaded from is refused always
    (:mod:`diffq.saving`)."""
    if not _is_pipeline(pipe):
        raise UnsupportedTargetError(
            f"diffq.save writes a pipeline; got a {type(pipe).__name__}. Save a bare quantized model with its "
            "own save_pretrained (a diffusers model) or torch.save."
        )
    return save_quantized(pipe, path_like(directory, "the folder to save to"), overwrite=overwrite)


def calibrate(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int = 8,
    guidance_scale: float | None = None,
    *,
    layers: Mapping[str, nn.Module] | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> CalibrationStats:
    """Run the float pipeline over prompts; per-layer, per-step activation statistics."""
    whole_number(num_inference_steps, "num_inference_steps")
    if guidance_scale is not None:
        finite_number(guidance_scale, "guidance_scale", low=0)
    denoiser = denoiser_of(pipe)
    if layers is None:
        layers, _ = adapter_for(denoiser).layers(denoiser)
    prompts = list(prompts) if prompts is not None else default_prompts(pipe)
    return calibrate_pipeline(
        pipe, dict(layers), prompts, num_inference_steps, guidance_scale, progress=progress, **call_kwargs
    )


def allocate(
    target: Any,
    stats: CalibrationStats | None = None,
    *,
    preset: str | Recipe = "w4a8",
    budget: float | None = None,
    sensitivity: Sensitivity | str | os.PathLike | None = None,
    content_share: float | None = None,
    check: bool = True,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int = 8,
    call_kwargs: Mapping[str, Any] | None = None,
    temporal_bits: int | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    progress: bool = True,
    **overrides: Any,
) -> QuantPlan:
    """The per-layer plan of a preset for a pipeline or denoiser.

    Calibrated presets read ``stats`` (from :func:`calibrate`) to choose, per layer, timestep
    groups, smoothing and clipping; ``-rtn`` presets give every layer the same config. Mixed
    precision (``preset="mixed", budget=4.0`` or ``preset="w3.5a8"``) solves an integer program on
    ``sensitivity`` (from :func:`sensitivity`, or its saved file) for the bits of each layer, jointly
    over both metric groups, or — with ``content_share`` — MixDQ's split: the content layers get that
    fraction of the bit budget and the quality layers the rest. With a pipeline and ``check``, the
    solved plan is then compared end to end with the best uniform plan within the budget, on
    ``prompts`` (default: the first four calibration prompts) at ``num_inference_steps`` with
    ``call_kwargs``, and the one closer to full precision is returned (see its ``note``).
    ``overrides`` replace fields of a uniform preset's :class:`LayerConfig` (e.g. ``a_mode="dynamic"``).
    ``temporal_bits`` adds the temporal modulation layers, weight-only, and ``include`` /
    ``exclude`` narrow the layers planned (see :func:`quantize`).
    """
    of_type(stats, "stats", CalibrationStats, "CalibrationStats from diffq.calibrate, or None", optional=True)
    _check_plan_numbers(budget, content_share)
    _check_overrides(overrides)
    selection = LayerSelection.of(include, exclude)
    temporal = temporal_config(temporal_bits) if temporal_bits is not None else None
    bare = not _is_pipeline(target)
    model = target if bare else denoiser_of(target)
    adapter = _adapter(model, bare=bare)
    layers, kept = selection.apply(*adapter.layers(model))
    recipe, inputs = get_preset(preset), PlanInputs(layers, kept, stats, adapter.concat_splits(model))
    call_kwargs = dict(call_kwargs or {})
    if sensitivity is not None and not isinstance(sensitivity, Sensitivity):
        sensitivity = Sensitivity.load(sensitivity)
    plan = build_plan(
        recipe, inputs, progress=progress, sensitivity=sensitivity, budget=budget, content_share=content_share,
        **overrides,
    )
    if recipe.is_mixed and check and not bare:
        probe_prompts = list(prompts) if prompts is not None else default_prompts(target)[:4]
        plan, _scores = keep_better_than_uniform(
            target, recipe, plan, inputs, sensitivity, budget, probe_prompts, num_inference_steps,
            progress=progress, **call_kwargs,
        )
    if selection:
        plan = replace(plan, selection=selection.to_dict())
    if temporal is None:
        return plan
    temporal_layers = {n: m for n, m in adapter.temporal_layers(model).items() if selection.allows(n, m)}
    return with_temporal_layers(plan, temporal_layers, temporal)


def sensitivity(
    pipe: Any,
    stats: CalibrationStats | None = None,
    candidates: Sequence[Candidate] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 8,
    seed: int = 0,
    cache: str | os.PathLike | None = "auto",
    shard: tuple[int, int] = (0, 1),
    metric: SensitivityMetric = "decoupled",
    include: Patterns = None,
    exclude: Patterns = None,
    progress: bool = True,
    overwrite: bool = False,
    **call_kwargs: Any,
) -> Sensitivity:
    """Quantize each layer alone with each candidate and score it against full precision.

    With ``metric="decoupled"`` (MixDQ's) content layers are scored by SSIM of the final images and
    quality layers by SQNR (dB) of the denoiser output; with ``metric="image"`` every layer by the
    PSNR (dB) of the final images. ``cache`` is a JSON file the analysis resumes from and writes
    after every layer (``"auto"``: under ``$DIFFQ_CACHE`` or ``~/.cache/diffq``; ``None``: no file).
    A rerun with the same settings continues where an interrupted one stopped (as ``diffq eval``
    does); a file at ``cache`` that is not an analysis is refused unless ``overwrite=True``.
    ``include`` / ``exclude`` limit the layers analysed (see :func:`quantize`).
    """
    check_metric(metric)
    whole_number(num_inference_steps, "num_inference_steps")
    of_type(stats, "stats", CalibrationStats, "CalibrationStats from diffq.calibrate, or None", optional=True)
    denoiser = denoiser_of(pipe)
    layers, _ = LayerSelection.of(include, exclude).apply(*adapter_for(denoiser).layers(denoiser))
    prompts = list(prompts) if prompts is not None else default_prompts(pipe)[:4]
    candidates = _candidates(candidates) if candidates is not None else default_candidates()
    if stats is None:
        stats = calibrate_pipeline(pipe, layers, prompts, num_inference_steps, progress=progress, **call_kwargs)
    if cache == "auto":
        key = fingerprint(pipe, list(layers), candidates, prompts, num_inference_steps, seed, call_kwargs,
                          metric=metric)
        cache = cache_dir() / "sensitivity" / f"{key}.json"
    return measure_sensitivity(
        pipe, layers, candidates, stats, prompts, num_inference_steps, seed, cache=cache, shard=shard,
        progress=progress, metric=metric, overwrite=overwrite, **call_kwargs,
    )


_measure_sensitivity = sensitivity  # quantize() takes a `sensitivity` argument that shadows the function


def cache_dir() -> Path:
    """Where diffq keeps resumable analyses: ``$DIFFQ_CACHE`` or ``~/.cache/diffq``."""
    return Path(os.environ.get("DIFFQ_CACHE", Path.home() / ".cache" / "diffq"))


def convert(target: Any, plan: QuantPlan, stats: CalibrationStats | None = None, *, progress: bool = True) -> Any:
    """Swap the planned layers of a pipeline's denoiser (or of a module) for quantized ones, in place."""
    of_type(plan, "plan", QuantPlan, "a QuantPlan (from diffq.allocate or QuantPlan.from_json)")
    of_type(stats, "stats", CalibrationStats, "CalibrationStats from diffq.calibrate, or None", optional=True)
    model = denoiser_of(target) if _is_pipeline(target) else target
    if not isinstance(model, nn.Module):
        raise UnsupportedTargetError(f"cannot convert a {type(target).__name__}; pass a diffusers pipeline or an nn.Module.")
    convert_model(model, plan, stats, progress=progress)
    _finish_conversion(model, plan)
    return manage(target) if _is_pipeline(target) else target


LOW_MEMORY_FACTOR = 2.0
"""``low_memory="auto"`` offloads when the denoiser's float weights times this exceed the free memory
(quantizing in memory peaks at 1.7–2.7x them: benchmarks/RESULTS.md, "Peak memory of diffq quantize")."""


def _offload_denoiser(resolved: Any, denoiser: nn.Module, low_memory: bool | str, recipe: Recipe,
                      is_pipe: bool, progress: bool) -> Offloaded | None:
    """The denoiser with its weights on disk (:mod:`diffq.offload`) when ``low_memory`` asks for it."""
    if low_memory not in (True, False, "auto"):
        raise QuantizationInputError(f"low_memory={low_memory!r}; use True, False or 'auto'.")
    if low_memory is True and recipe.is_mixed:
        raise QuantizationInputError(
            "low_memory=True works with uniform presets; mixed precision's sensitivity analysis quantizes each "
            "layer in turn inside the whole model. Use a uniform preset, or low_memory=False."
        )
    if low_memory == "auto":
        available = available_memory()
        need = LOW_MEMORY_FACTOR * sum(t.numel() * t.element_size() for t in denoiser.state_dict().values())
        low_memory = not recipe.is_mixed and available is not None and need > available
    if not low_memory:
        return None
    files = denoiser_weight_files(resolved) if is_pipe else []
    offloaded = Offloaded(denoiser, safetensors_index(files))
    if progress and offloaded.spilled_bytes:
        print(f"diffq: low memory: {offloaded.spilled_bytes / 2**20:,.0f} MiB of the denoiser's tensors are not in "
              "its safetensors files and were written to a temporary file.")
    return offloaded


def _finish_conversion(model: nn.Module, plan: QuantPlan) -> None:
    """What follows swapping in a plan's quantized layers: the plan saved with the model, and the
    timestep made visible to the layers."""
    attach_plan(model, plan)
    install_timestep_hook(model)


def _calibrate_module(
    module: nn.Module,
    layers: dict[str, nn.Module],
    inputs: Sequence[Mapping[str, Any]],
    progress: bool,
    preset: str,
) -> CalibrationStats:
    if not inputs or not all(isinstance(kw, Mapping) for kw in inputs):
        raise QuantizationInputError(
            f"preset {preset!r} calibrates: to quantize a bare module, pass calibration=[{{...forward kwargs...}}, "
            f"...] (example inputs), or use the baseline {preset.removesuffix('-rtn')}-rtn with "
            "activations='dynamic'."
        )
    install_timestep_hook(module)
    observer = ActivationObserver(layers)
    with observer.observe(module) as stats, torch.no_grad():
        for kwargs in tqdm(inputs, desc="diffq: calibrating", disable=not progress):
            module(**kwargs)
    return stats


def _resolve_target(target: Any, model: str | None, load_kwargs: dict) -> Any:
    if _is_pipeline(target) or isinstance(target, nn.Module):
        if model is not None:
            raise QuantizationInputError("model= is only used when target is a pipeline class; drop it.")
        return target
    if inspect.isclass(target):
        from diffusers import DiffusionPipeline

        if issubclass(target, DiffusionPipeline):
            return load_pipeline(model or default_checkpoint(target), pipeline_class=target, **load_kwargs)
    if isinstance(target, (str, os.PathLike)):
        return load(target, **load_kwargs)
    raise UnsupportedTargetError(
        f"cannot quantize a {type(target).__name__}; pass a diffusers pipeline, a pipeline class "
        "(e.g. StableDiffusionPipeline), a bundled name / Hub id / local folder, or a denoiser nn.Module."
    )


def quantize(
    target: Any,
    preset: str | Recipe = "w4a8",
    *,
    model: str | None = None,
    calibration: Sequence[str] | Sequence[Mapping[str, Any]] | CalibrationStats | None = None,
    num_calibration_steps: int = 8,
    activations: str | None = None,
    rank: int | None = None,
    weight_rounding: str | None = None,
    budget: float | None = None,
    sensitivity: Sensitivity | str | os.PathLike | None = None,
    sensitivity_metric: SensitivityMetric = "decoupled",
    components: Sequence[str] | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    temporal_bits: int | None = None,
    check: bool = True,
    low_memory: bool | str = "auto",
    progress: bool = True,
    load_kwargs: Mapping[str, Any] | None = None,
    pipeline_class: type | str | None = None,
    config: str | os.PathLike | None = None,
    **calibration_kwargs: Any,
):
    """Quantize a diffusion pipeline (or a bare denoiser) with a preset; returns it.

    Args:
        target: a ``DiffusionPipeline`` instance, a pipeline class (its default checkpoint, or
            ``model=``), a bundled name / local folder / Hub id, or a denoiser ``nn.Module``.
        preset: ``"w8a8"``, ``"w4a8"``, ``"w4a16"``, ``"w8a16"``, ``"w4a4"`` (calibrated), or their
            ``-rtn`` baselines.
        model: with a pipeline class, the checkpoint to load instead of the class's default.
        calibration: prompts to calibrate on (default: a few per model), precomputed
            :class:`CalibrationStats`, or — for a bare module — a list of forward-kwargs dicts.
        num_calibration_steps: denoising steps per calibration prompt.
        activations: ``"dynamic"`` or ``"static"`` to override the preset's activation scales.
        rank: rank of the 16-bit low-rank branch on Linear and Conv2d layers (``w4a4`` uses 32;
            ``0`` = none).
        weight_rounding: ``"nearest"`` or ``"gptq"`` to override how the preset rounds weights onto
            their grid (``w4a8``, ``w4a16`` and ``w4a4`` use GPTQ, the others nearest); GPTQ moves
            each input column's rounding error onto the columns not yet rounded, against the
            Hessian of the calibration inputs (:mod:`diffq.gptq`), and needs calibration.
        budget: average weight bits for ``preset="mixed"``.
        sensitivity: a precomputed :class:`Sensitivity` (or its file) for mixed precision;
            otherwise it is measured (and cached, see :func:`sensitivity`).
        sensitivity_metric: how mixed precision measures it: ``"decoupled"`` (MixDQ's SSIM for
            content layers, SQNR for quality layers) or ``"image"`` (final-image PSNR for every
            layer; README, "Mixed precision").
        components: pipeline components to quantize (default: the denoiser). Others, such as
            ``"text_encoder"`` or ``"text_encoder_2"`` (T5 in Flux/SD3/PixArt), are quantized
            weight-only with the preset's weight bits.
        include: quantize only the layers these patterns match: globs on layer names, where a
            parent's name selects its layers (``"transformer_blocks"``, ``"down_blocks.*.attentions"``),
            or ``"class:Conv2d"`` / ``nn.Conv2d`` for a layer type (:mod:`diffq.selection`).
        exclude: keep the layers these patterns match in 16-bit (``exclude="class:Conv2d"``: every
            convolution). Layers the model's adapter keeps (first/last layers, embeddings) stay
            16-bit either way; the plan records the patterns, its ``skipped`` says why each layer
            was left out, and a pattern that matches nothing is an error.
        temporal_bits: the denoiser's temporal modulation layers (AdaLN modulation, ResNet time
            projections), kept in 16-bit by default, are quantized weight-only: ``8`` per channel or
            ``4`` in groups of 64. On Flux.1 they hold 27% of the weights (README, "Presets").
        check: mixed precision only: generate the calibration prompts with the solved plan and
            with the best uniform plan within the budget, and keep the one closer to full
            precision (the plan's ``note`` says which, with both scores).
        low_memory: keep the float denoiser's weights on disk and read each layer's just before it runs
            or is quantized (:mod:`diffq.offload`), so calibration and conversion hold one layer of float
            weights at a time, not the model; the result is the same, bit for bit. ``"auto"`` (default):
            when twice the denoiser's float weights exceed the free memory. Uniform presets only.
        progress: show progress bars.
        load_kwargs: passed to ``from_pretrained`` when diffq loads the pipeline.
        pipeline_class: with a single-file checkpoint as target (``"model.safetensors"``), the
            pipeline class diffusers' ``from_single_file`` builds (``StableDiffusionPipeline``, ...).
        config: with a single file, a diffusers folder or Hub id of the same architecture that
            supplies the configuration (and what the file lacks); needed offline.
        calibration_kwargs: passed to the pipeline call during calibration (``height``, ...).

    A pipeline or module you pass is modified **in place** (its denoiser's layers are swapped)
    and returned; nothing on disk is touched.
    """
    recipe = get_preset(preset)
    check_metric(sensitivity_metric)
    whole_number(num_calibration_steps, "num_calibration_steps")
    _check_plan_numbers(budget, None)
    load_kwargs = mapping(load_kwargs, "load_kwargs")
    selection = LayerSelection.of(include, exclude)
    overrides = {}
    if activations is not None:
        if activations not in ("dynamic", "static"):
            raise QuantizationInputError(f"activations={activations!r}; use 'dynamic' or 'static'.")
        overrides["a_mode"] = activations
    if rank is not None:
        overrides["rank"] = whole_number(rank, "rank (0: no low-rank branch; e.g. 32)", minimum=0)
    if weight_rounding is not None:
        if weight_rounding not in ("nearest", "gptq"):
            raise QuantizationInputError(f"weight_rounding={weight_rounding!r}; use 'nearest' or 'gptq'.")
        overrides["w_round"] = weight_rounding
    resolved = _resolve_target(target, model, {**load_kwargs, **single_file_kwargs(target, pipeline_class, config)})
    is_pipe = _is_pipeline(resolved)
    denoiser = denoiser_of(resolved) if is_pipe else resolved
    from diffq.pipelines.serialization import plan_of

    if plan_of(denoiser) is not None:
        raise QuantizationInputError(
            "this model is already quantized by diffq; load the float model again to quantize it differently."
        )
    extra_components = _extra_components(resolved, components, is_pipe)  # validate before any work
    if temporal_bits is not None:
        temporal_config(temporal_bits)
    layers, _kept = _adapter(denoiser, bare=not is_pipe).layers(denoiser)
    if layers:
        layers, _kept = selection.apply(layers, _kept)
    if not layers:
        raise UnsupportedTargetError(f"{type(denoiser).__name__} has no Linear or Conv2d layer that diffq can quantize.")
    if recipe.is_mixed and not is_pipe:
        raise UnsupportedTargetError("mixed precision measures images: pass a pipeline, not a bare module.")
    prompts = None if isinstance(calibration, CalibrationStats) or calibration is None else list(calibration)

    probe_prompts = prompts[:4] if prompts is not None else (default_prompts(resolved)[:4] if is_pipe else None)

    offloaded = _offload_denoiser(resolved, denoiser, low_memory, recipe, is_pipe, progress)
    try:
        stats = _calibration_stats(resolved, denoiser, layers, recipe, calibration, overrides, num_calibration_steps,
                                   progress, calibration_kwargs)
        if recipe.is_mixed and sensitivity is None:
            sensitivity = _measure_sensitivity(
                resolved, stats, recipe.candidates, probe_prompts, num_inference_steps=num_calibration_steps,
                metric=sensitivity_metric, include=include, exclude=exclude, progress=progress, **calibration_kwargs,
            )
        plan = allocate(
            resolved, stats, preset=recipe, budget=budget, sensitivity=sensitivity, check=check,
            prompts=probe_prompts, num_inference_steps=num_calibration_steps, call_kwargs=calibration_kwargs,
            temporal_bits=temporal_bits, include=include, exclude=exclude, progress=progress, **overrides,
        )
        convert_model(denoiser, plan, stats, progress=progress)
    finally:
        if offloaded is not None:
            offloaded.restore()
    _finish_conversion(denoiser, plan)

    for name in extra_components:
        quantize_weights_only(getattr(resolved, name), recipe, progress=progress)
    return manage(resolved) if is_pipe else resolved


def _calibration_stats(
    resolved: Any, denoiser: nn.Module, layers: dict[str, nn.Module], recipe: Recipe, calibration: Any,
    overrides: Mapping[str, Any], num_calibration_steps: int, progress: bool, call_kwargs: Mapping[str, Any],
) -> CalibrationStats | None:
    """The statistics the recipe's plan reads: given, measured on the pipeline's prompts, measured on a
    bare module's example inputs, or ``None`` when the recipe needs none."""
    if isinstance(calibration, CalibrationStats):
        return calibration
    if not recipe.needs_calibration(**overrides):
        return None
    if _is_pipeline(resolved):
        prompts = list(calibration) if calibration is not None else default_prompts(resolved)
        return calibrate_pipeline(resolved, layers, prompts, num_calibration_steps, progress=progress, **call_kwargs)
    return _calibrate_module(denoiser, layers, list(calibration or []), progress, recipe.name)


def _check_plan_numbers(budget: Any, content_share: Any) -> None:
    if budget is not None:
        finite_number(budget, "budget (average weight bits)", low=0)
    if content_share is not None:
        finite_number(content_share, "content_share", low=0, high=1)


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclass_fields(LayerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise QuantizationInputError(
            f"unknown layer setting(s) {', '.join(map(repr, unknown))}; allocate's extra keywords set LayerConfig "
            f"fields: {', '.join(sorted(known))}."
        )


def _candidates(candidates: Any) -> list[Candidate]:
    """A list of candidates; labels such as ``"w4a8"`` are parsed."""
    if isinstance(candidates, (str, Candidate)) or not isinstance(candidates, Sequence) or not candidates:
        raise QuantizationInputError(
            f"candidates must be a non-empty list of Candidate or labels such as 'w4a8', got {candidates!r}."
        )
    out = []
    for item in candidates:
        if isinstance(item, str):
            item = Candidate.parse(item)
        out.append(of_type(item, "each candidate", Candidate, "a Candidate or a label such as 'w4a8'"))
    return out


def _extra_components(pipe: Any, components: Sequence[str] | None, is_pipe: bool) -> list[str]:
    """The non-denoiser components to quantize, validated against the pipeline."""
    if components is None:
        return []
    if not is_pipe:
        raise QuantizationInputError("components= selects parts of a pipeline; drop it for a bare module.")
    available = {n for n, c in pipe.components.items() if isinstance(c, nn.Module)}
    unknown = [c for c in components if c not in available]
    if unknown:
        raise QuantizationInputError(
            f"{type(pipe).__name__} has no quantizable component {unknown}; its model components are {sorted(available)}."
        )
    denoiser = denoiser_name(pipe)
    if denoiser not in components:
        raise QuantizationInputError(f"components must include the denoiser {denoiser!r}; got {list(components)}.")
    return [c for c in components if c != denoiser]


def quantize_weights_only(module: nn.Module, recipe: Recipe, progress: bool = True) -> nn.Module:
    """Quantize every Linear layer of a module (e.g. a text encoder) weight-only, with MSE-clipped ranges."""
    base = weight_only_config(recipe.layer.w_bits, recipe.layer.w_group_size)
    layers = {
        n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QUANTIZED_MODULES)
    }
    if not layers:
        raise UnsupportedTargetError(f"{type(module).__name__} has no float Linear layer to quantize.")
    plan = QuantPlan(preset=f"{recipe.name} weight-only",
                     layers={n: resolve_config(m, base) for n, m in layers.items()})
    convert_model(module, plan, None, progress=progress)
    attach_plan(module, plan)
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (a pipeline: its denoiser's)."""
    from diffq.modules import weight_bytes as _bytes

    return _bytes(denoiser_of(module) if _is_pipeline(module) else module)
