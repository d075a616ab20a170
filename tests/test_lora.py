"""LoRA adapters on quantized pipelines: PEFT wraps diffq layers with a 16-bit low-rank path."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffq
from diffq.pipelines import denoiser_name, denoiser_of
from diffq.pipelines.testing import (
    TINY_PROMPTS,
    run_tiny,
    tiny_call_kwargs,
    tiny_flux_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def psnr(a, b):
    return 10 * np.log10(1 / np.mean((a - b) ** 2))


def make_lora(build, pipeline_class, folder, std=0.05):
    """A LoRA trained nowhere: random B so that it visibly changes the image; saved like a real one."""
    pipe = build(0)
    denoiser = denoiser_of(pipe)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = {f"{denoiser_name(pipe)}_lora_layers": get_peft_model_state_dict(denoiser)}
    pipeline_class.save_lora_weights(folder, **layers)
    return run_tiny(pipe)


@pytest.mark.parametrize("build, pipeline_class", [(tiny_sd_pipeline, StableDiffusionPipeline),
                                                   (tiny_sdxl_pipeline, StableDiffusionXLPipeline),
                                                   (tiny_flux_pipeline, FluxPipeline)])
def test_lora_on_quantized_pipeline_tracks_float_lora(build, pipeline_class, tmp_path):
    float_base = run_tiny(build(0))
    float_lora = make_lora(build, pipeline_class, tmp_path)
    pipe = build(0)
    diffq.quantize(pipe, "w8a8", calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                   **tiny_call_kwargs(pipe))
    base = run_tiny(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    wrapped = [m for m in denoiser_of(pipe).modules() if hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(m.base_layer, diffq.QuantizedLinear) for m in wrapped)
    with_lora = run_tiny(pipe)
    assert psnr(with_lora, base) < psnr(float_lora, float_base) + 3  # the LoRA really acts
    assert psnr(with_lora, float_lora) > psnr(base, float_base) - 3  # as close to float as without it

    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert np.allclose(run_tiny(pipe), base, atol=1e-6)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = run_tiny(pipe)
    assert psnr(half, base) > psnr(with_lora, base) and psnr(half, with_lora) > psnr(base, with_lora)


def test_import_diffq_leaves_diffusers_lora_loader_alone():
    """The Flux LoRA shim is installed when a Flux transformer is quantized, not on ``import diffq``."""
    import subprocess
    import sys

    code = ("import diffq\n"
            "from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin as M\n"
            "assert not getattr(M._maybe_expand_lora_state_dict.__func__, '_diffq_shim', False)\n"
            "from diffq.pipelines.testing import tiny_flux_pipeline\n"
            "diffq.quantize(tiny_flux_pipeline(), 'w8a16-rtn', progress=False)\n"
            "assert M._maybe_expand_lora_state_dict.__func__._diffq_shim\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
