"""Run a float pipeline over prompts while observers record per-step activation statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calibration import ActivationObserver, CalibrationStats
from diffq.context import set_cfg_split
from diffq.errors import QuantizationInputError
from diffq.pipelines.adapters import adapter_for, denoiser_of
from diffq.pipelines.patching import install_timestep_hook

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old fisherman, dramatic light",
    "a bowl of fruit on a wooden table, still life",
)


def default_prompts(pipe: Any) -> list[str]:
    """Calibration prompts: a bundled model's own prompts, otherwise a small generic set."""
    from diffq.pipelines.loading import bundled_models

    source = str(getattr(pipe, "name_or_path", "") or getattr(getattr(pipe, "config", None), "_name_or_path", ""))
    if source and source in {str(folder) for folder in bundled_models().values()}:
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
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise QuantizationInputError("calibration prompts must be a non-empty list of non-empty strings.")
    if num_inference_steps < 1:
        raise QuantizationInputError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    denoiser = denoiser_of(pipe)
    install_timestep_hook(denoiser)
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    bos_layers = adapter_for(denoiser).bos_layers(set(layers)) if has_bos_token(pipe) else set()
    observer = ActivationObserver(layers, sample_rows=sample_rows, bos_layers=bos_layers, seed=seed)

    def flag_guidance(_module: nn.Module, _args: tuple) -> None:
        set_cfg_split(bool(getattr(pipe, "do_classifier_free_guidance", False)))

    guidance_hook = denoiser.register_forward_pre_hook(flag_guidance)
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(prompts) * num_inference_steps, desc="diffq: calibrating", disable=not progress)

    def on_step_end(_pipe: Any, _step: int, _t: Any, kwargs: dict) -> dict:
        bar.update(1)
        return kwargs

    try:
        with observer.observe() as stats, torch.no_grad():
            for i, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(seed + i)
                pipe(
                    prompt=prompt,
                    num_inference_steps=num_inference_steps,
                    generator=generator,
                    output_type="latent",
                    callback_on_step_end=on_step_end,
                    **call_kwargs,
                )
    finally:
        guidance_hook.remove()
        set_cfg_split(False)
        bar.close()
        pipe._progress_bar_config = saved_bar
    return stats
