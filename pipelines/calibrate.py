"""Run a float pipeline over prompts while observers record per-step activation statistics."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import ActivationObserver, CalibrationStats
from diffq.context import set_cfg_split
from diffq.errors import QuantizationInputError, UnsupportedTargetError
from diffq.pipelines.adapters import adapter_for, denoiser_of
from diffq.pipelines.call_defaults import bundled_name, call_defaults
from diffq.pipelines.patching import install_timestep_hook

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old fisherman, dramatic light",
    "a bowl of fruit on a wooden table, still life",
)


def conditioning(pipe: Any, items: Sequence[str | int]) -> dict[str, Any]:
    """Pipeline-call arguments for a batch of conditions: ``prompt=`` for text-to-image pipelines,
    ``class_labels=`` (label names or ids) for class-conditional ones such as ``DiTPipeline``."""
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        if not all(isinstance(p, str) and p.strip() for p in items):
            raise QuantizationInputError("calibration prompts must be non-empty strings.")
        return {"prompt": list(items)}
    if "class_labels" in params:
        labels = []
        for item in items:
            if isinstance(item, int):
                labels.append(item)
                continue
            try:
                labels.extend(pipe.get_label_ids([item]))
            except (ValueError, KeyError, AttributeError):
                known = ", ".join(list(getattr(pipe, "labels", {}))[:5])
                raise QuantizationInputError(
                    f"{type(pipe).__name__} is class-conditional and has no label {item!r}; pass label names "
                    f"(e.g. {known}) or integer class ids."
                ) from None
        return {"class_labels": labels}
    raise UnsupportedTargetError(
        f"{type(pipe).__name__} takes neither prompts nor class labels; diffq cannot drive it for calibration. "
        "Quantize its denoiser as a bare module with calibration=[{...forward kwargs...}]."
    )


def default_call_kwargs(pipe: Any) -> dict[str, Any]:
    """:func:`~diffq.pipelines.call_defaults.call_defaults` of ``pipe`` without the number of steps
    (calibration and the sensitivity analysis choose their own)."""
    kwargs = call_defaults(pipe)
    kwargs.pop("num_inference_steps", None)
    return kwargs


def default_prompts(pipe: Any) -> list[str]:
    """Calibration prompts: a bundled model's own prompts, a class-conditional model's first labels,
    otherwise a small generic set."""

    labels = getattr(pipe, "labels", None)
    if "prompt" not in inspect.signature(pipe.__call__).parameters and labels:
        return list(labels)[:4]
    if bundled_name(pipe) is not None:
        from diffq.pipelines import reference

        return [prompt for prompt, _digit in reference.eval_prompts(8)]
    return list(DEFAULT_PROMPTS)


def has_bos_token(pipe: Any) -> bool:
    """Whether the pipeline's (first) tokenizer starts every prompt with a BOS token (CLIP does, T5 does not)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def calibrate_pipeline(
    pipe: Any,
    layers: dict[str, nn.Module],
    prompts: Sequence[str],
    num_inference_steps: int = 8,
    guidance_scale: float | None = None,
    seed: int = 0,
    progress: bool = True,
    sample_rows: int = 256,
    **call_kwargs: Any,
) -> CalibrationStats:
    """Run ``pipe`` on each prompt and return the statistics of ``layers``' inputs per timestep.

    Statistics are kept per classifier-free-guidance half when the pipeline uses guidance, and
    cross-attention key/value inputs leave their BOS token out when the tokenizer adds one.
    """
    if isinstance(prompts, str) or not prompts:
        raise QuantizationInputError("calibration prompts must be a non-empty list (of prompts or class labels).")
    by_label = "class_labels" in conditioning(pipe, prompts)  # also validates before any work
    if num_inference_steps < 1:
        raise QuantizationInputError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    denoiser = denoiser_of(pipe)
    install_timestep_hook(denoiser)
    call_kwargs = {**default_call_kwargs(pipe), **call_kwargs}
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    bos_layers = adapter_for(denoiser).bos_layers(set(layers)) if has_bos_token(pipe) else set()
    observer = ActivationObserver(layers, sample_rows=sample_rows, bos_layers=bos_layers, seed=seed)

    def flag_guidance(_module: nn.Module, _args: tuple) -> None:
        # DiT-style pipelines always double the batch for guidance above 1 and have no flag for it.
        guided = getattr(pipe, "do_classifier_free_guidance", None)
        if guided is None:
            guided = by_label and call_kwargs.get("guidance_scale", 4.0) > 1
        set_cfg_split(bool(guided))

    bar = tqdm(total=len(prompts) * num_inference_steps, desc="diffq: calibrating", disable=not progress)

    def count_step(*_: Any) -> None:  # one denoiser call per step; returns None so the output stands
        bar.update(1)  # (tqdm's update returns True when it redraws: a hook returning it replaces the output)

    hooks = [denoiser.register_forward_pre_hook(flag_guidance), denoiser.register_forward_hook(count_step)]
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    latent = not by_label and "output_type" in inspect.signature(pipe.__call__).parameters
    try:
        with observer.observe(denoiser) as stats, torch.no_grad():
            for i, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(seed + i)
                pipe(
                    **conditioning(pipe, [prompt]),
                    num_inference_steps=num_inference_steps,
                    generator=generator,
                    **({"output_type": "latent"} if latent else {}),
                    **call_kwargs,
                )
    finally:
        for hook in hooks:
            hook.remove()
        set_cfg_split(False)
        bar.close()
        pipe._progress_bar_config = saved_bar
    return stats
