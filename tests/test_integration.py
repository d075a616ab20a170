"""diffq inside diffusers: plain from_pretrained, text encoders, and ordinary pipeline options."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel

import diffq
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import (
    TINY_PROMPTS,
    run_tiny,
    tiny_call_kwargs,
    tiny_flux_pipeline,
    tiny_sd_pipeline,
)


def quantized(build, preset="w4a8", **kwargs):
    pipe = build(0)
    return diffq.quantize(pipe, preset, calibration=TINY_PROMPTS[:2], num_calibration_steps=4, progress=False,
                          **tiny_call_kwargs(pipe), **kwargs)


def test_plain_diffusers_from_pretrained_loads_diffq_layers(tmp_path):
    pipe = quantized(tiny_sd_pipeline)
    expected = run_tiny(pipe)
    diffq.save(pipe, tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.unet.up_blocks[1].resnets[0].conv1, diffq.QuantizedConv2d)
    assert plan_of(loaded.unet) == plan_of(pipe.unet)
    assert np.array_equal(run_tiny(loaded), expected)
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert isinstance(unet.up_blocks[1].resnets[0].conv1, diffq.QuantizedConv2d)
    assert np.array_equal(run_tiny(diffq.load(tmp_path)), expected)
    # The folder a pipeline was loaded from is never written (diffq.saving), even a diffq checkpoint;
    # saving the loaded pipeline elsewhere gives the same checkpoint (no tensor stays memory-mapped).
    with pytest.raises(diffq.DiffQError, match="loaded from"):
        diffq.save(loaded, tmp_path, overwrite=True)
    diffq.save(loaded, tmp_path / "again")
    assert np.array_equal(run_tiny(DiffusionPipeline.from_pretrained(tmp_path / "again")), expected)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    import json

    diffq.save(quantized(tiny_sd_pipeline, "w8a16"), tmp_path)
    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    first = next(iter(config["quantization_config"]["plan"]["layers"]))
    config["quantization_config"]["plan"]["layers"][first]["w_bits"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(diffq.CheckpointError, match="does not match|re-save|quantize and save"):
        diffq.load(tmp_path)


@pytest.mark.parametrize("build, components", [
    (tiny_sd_pipeline, ["unet", "text_encoder"]),
    (tiny_flux_pipeline, ["transformer", "text_encoder", "text_encoder_2"]),
])
def test_text_encoders_are_quantized_weight_only_and_round_trip(build, components, tmp_path):
    pipe = quantized(build, "w8a8", components=components)
    for name in components[1:]:
        encoder = getattr(pipe, name)
        layers = [m for m in encoder.modules() if isinstance(m, diffq.QuantizedLinear)]
        assert layers and all(m.config.a_bits is None for m in layers)  # weight-only
    expected = run_tiny(pipe)
    diffq.save(pipe, tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    for name in components[1:]:
        assert any(isinstance(m, diffq.QuantizedLinear) for m in getattr(loaded, name).modules())
    assert np.array_equal(run_tiny(loaded), expected)


def test_components_are_validated():
    pipe = tiny_sd_pipeline()
    with pytest.raises(diffq.DiffQError, match="no quantizable component"):
        diffq.quantize(pipe, "w8a16-rtn", components=["unet", "text_encoder_9"], progress=False)
    with pytest.raises(diffq.DiffQError, match="must include the denoiser"):
        diffq.quantize(pipe, "w8a16-rtn", components=["text_encoder"], progress=False)


def test_other_steps_scheduler_and_step_callback():
    pipe = quantized(tiny_sd_pipeline, "w8a8")  # calibrated with 4 steps and DDIM
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []

    def on_step_end(_pipe, step, timestep, kwargs):
        seen.append(float(timestep))
        return kwargs

    images = run_tiny(pipe, steps=7, callback_on_step_end=on_step_end)
    assert np.isfinite(images).all() and len(seen) == 7


def test_model_cpu_offload_where_supported():
    pipe = quantized(tiny_sd_pipeline, "w8a8")
    expected = run_tiny(pipe)
    if not torch.cuda.is_available():
        pytest.skip("model CPU offload moves modules to an accelerator; this machine has none")
    pipe.enable_model_cpu_offload()
    assert np.allclose(run_tiny(pipe), expected, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the quantized denoiser is checked on GPU")
def test_torch_compile_on_gpu():
    pipe = quantized(tiny_sd_pipeline, "w8a8").to("cuda")
    expected = run_tiny(pipe)
    pipe.unet = torch.compile(pipe.unet)
    assert np.allclose(run_tiny(pipe), expected, atol=1e-2)
