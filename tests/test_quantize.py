"""diffq.quantize on tiny pipelines of every architecture family, and its errors."""

import numpy as np
import pytest
import torch
from torch import nn

import diffq
from diffq.modules import QUANTIZED_MODULES
from diffq.pipelines import adapter_for, denoiser_of
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import (
    TINY_ARCHITECTURES,
    TINY_BUILDERS,
    TINY_PROMPTS,
    run_tiny,
    tiny_call_kwargs,
    tiny_sd_pipeline,
)

# PSNR (dB) of the quantized images against the float images of the same seed, 2 steps.
# w8a8-rtn (no calibration, no smoothing) on the tiny random SD2 UNet measures 28.8-30.3 dB over seeds 0-3
# (SD 32-35, SDXL 37, the DiTs 53-81); the calibrated w8a8 keeps the 30 dB floor there.
PSNR_FLOOR = {"w8a8": 30.0, "w8a8-rtn": 28.0, "w4a8": 20.0, "w4a8-rtn": 20.0, "w4a16": 22.0}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def quantize_tiny(pipe, preset, **kwargs):
    return diffq.quantize(
        pipe, preset, calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
        **tiny_call_kwargs(pipe), **kwargs,
    )


def quantized_layer_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized modules, their weights' bytes in fp32)."""
    q_bytes = fp32 = 0
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            q_bytes += module.qweight.numel() + module.weight_scale.numel() * module.weight_scale.element_size()
            fp32 += module.rows * module.cols * 4
    return q_bytes, fp32


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
@pytest.mark.parametrize("preset", sorted(PSNR_FLOOR))
def test_quantized_pipeline_stays_close_to_float(arch, preset):
    pipe = TINY_BUILDERS[arch](0)
    reference = run_tiny(pipe)
    fp_bytes = diffq.weight_bytes(pipe)
    assert quantize_tiny(pipe, preset) is pipe  # in place
    images = run_tiny(pipe)
    assert images.shape == reference.shape
    assert np.isfinite(images).all()
    assert psnr(images, reference) >= PSNR_FLOOR[preset]

    denoiser = denoiser_of(pipe)
    plan = plan_of(denoiser)
    layers = dict(denoiser.named_modules())
    for name, module in layers.items():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, QUANTIZED_MODULES):
            assert name in plan.skipped, f"{name} is float but not documented as kept"
    assert all(isinstance(layers[name], QUANTIZED_MODULES) for name in plan.layers)
    assert set(plan.skipped) == {n for n in plan.skipped if adapter_for(denoiser).kept_reason(n)}

    q_bytes, fp32 = quantized_layer_bytes(denoiser)
    bits = 8 if preset.startswith("w8") else 4
    # Packed codes are bits/32 of fp32; fp32 scales per channel or per group add a little.
    assert bits / 32 <= q_bytes / fp32 <= bits / 32 + 4 / 16 / 4 + 0.01
    assert diffq.weight_bytes(pipe) < fp_bytes


def test_w4_weights_are_packed_two_per_byte():
    pipe = quantize_tiny(tiny_sd_pipeline(), "w4a16")
    module = next(m for m in denoiser_of(pipe).modules() if isinstance(m, diffq.QuantizedLinear))
    assert module.qweight.dtype == torch.uint8
    assert module.qweight.shape == (module.out_features, module.in_features // 2)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(diffq.DiffQError, match=r"unknown preset 'w5a7'.*w4a8.*w8a8"):
        diffq.quantize(tiny_sd_pipeline(), "w5a7")


def test_quantizing_twice_is_refused():
    pipe = quantize_tiny(tiny_sd_pipeline(), "w8a16")
    with pytest.raises(diffq.DiffQError, match="already quantized"):
        quantize_tiny(pipe, "w8a16")


def test_unsupported_target_and_pipeline_without_denoiser():
    with pytest.raises(diffq.UnsupportedTargetError, match="cannot quantize a int"):
        diffq.quantize(42, "w8a8")

    class NoDenoiser:
        pass

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline()
    with pytest.raises(diffq.UnsupportedTargetError, match="no denoiser"):
        diffq.quantize(pipe, "w8a8")
    with pytest.raises(diffq.UnsupportedTargetError):
        diffq.quantize(NoDenoiser, "w8a8")


def test_pipeline_class_offline_says_what_it_tried():
    from diffusers import StableDiffusionPipeline

    with pytest.raises(diffq.ModelLoadError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5.*local folder"):
        diffq.quantize(StableDiffusionPipeline, "w4a8")
    with pytest.raises(diffq.ModelLoadError, match="no-such-org/no-such-model"):
        diffq.quantize(StableDiffusionPipeline, "w4a8", model="no-such-org/no-such-model")


def test_bare_module_dynamic_and_calibrated():
    unet = tiny_sd_pipeline().unet
    sample = torch.randn(1, 4, 16, 16)
    kwargs = {"sample": sample, "timestep": torch.tensor(10), "encoder_hidden_states": torch.randn(1, 77, 64)}
    with torch.no_grad():
        reference = unet(**kwargs).sample
    with pytest.raises(diffq.DiffQError, match="calibration=.*activations='dynamic'"):
        diffq.quantize(unet, "w8a8", progress=False)
    diffq.quantize(unet, "w8a8", calibration=[kwargs], progress=False)
    with torch.no_grad():
        out = unet(**kwargs).sample
    assert float((out - reference).pow(2).mean() / reference.pow(2).mean()) < 1e-2

    mlp = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    with pytest.raises(diffq.DiffQError, match="w4a8-rtn"):
        diffq.quantize(mlp, "w4a8", activations="dynamic", progress=False)
    diffq.quantize(mlp, "w4a8-rtn", activations="dynamic", progress=False)
    assert isinstance(mlp[0], diffq.QuantizedLinear) and mlp[0].config.a_mode == "dynamic"


def test_precomputed_calibration_is_reused():
    pipe = tiny_sd_pipeline()
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **tiny_call_kwargs(pipe))
    steps = {len({t for t, _branch in s}) for s in stats.layers.values()}
    assert steps == {2}, "statistics are filed per denoising step"
    diffq.quantize(pipe, "w8a8", calibration=stats, progress=False)
    assert np.isfinite(run_tiny(pipe)).all()


def test_save_load_round_trip_is_bit_identical(tmp_path):
    pipe = quantize_tiny(tiny_sd_pipeline(), "w4a8")
    expected = run_tiny(pipe)
    diffq.save(pipe, tmp_path / "q")
    loaded = diffq.load(tmp_path / "q")
    assert isinstance(loaded.unet.conv_in, nn.Conv2d)
    assert plan_of(loaded.unet) == plan_of(pipe.unet)
    assert np.array_equal(run_tiny(loaded), expected)


def test_temporal_bits_quantizes_the_modulation_layers_weight_only(tmp_path):
    pipe = tiny_sd_pipeline()
    reference = run_tiny(pipe)
    plain = quantize_tiny(tiny_sd_pipeline(), "w4a8")
    temporal = adapter_for(pipe.unet).temporal_layers(pipe.unet)
    assert temporal and all(name.endswith("time_emb_proj") for name in temporal)
    quantize_tiny(pipe, "w4a8", temporal_bits=8)
    plan = plan_of(pipe.unet)
    for name in temporal:
        assert name not in plan.skipped and isinstance(pipe.unet.get_submodule(name), diffq.QuantizedLinear)
        config = plan.layers[name]
        assert (config.w_bits, config.w_group_size, config.a_bits, config.w_clip) == (8, None, None, "mse")
    assert {n: c for n, c in plan.layers.items() if n not in temporal} == plan_of(plain.unet).layers
    assert set(plan.skipped) == set(plan_of(plain.unet).skipped) - set(temporal)
    assert diffq.weight_bytes(pipe) < diffq.weight_bytes(plain)
    images = run_tiny(pipe)
    # 8-bit time projections cost little: on average over a few seeds, as one 2-step image of this
    # tiny model moves by a few tenths of a dB when one activation lands on the other side of a
    # rounding boundary (float32 rounding differs between the CPU kernel and the reference).
    seeds = range(4)
    references = [reference if seed == 0 else run_tiny(tiny_sd_pipeline(), seed=seed) for seed in seeds]
    with_temporal = np.mean([psnr(run_tiny(pipe, seed=s), r) for s, r in zip(seeds, references, strict=True)])
    without = np.mean([psnr(run_tiny(plain, seed=s), r) for s, r in zip(seeds, references, strict=True)])
    assert with_temporal >= without - 0.5
    diffq.save(pipe, tmp_path / "q")
    assert np.array_equal(run_tiny(diffq.load(tmp_path / "q")), images)

    four = quantize_tiny(tiny_sd_pipeline(), "w4a8", temporal_bits=4)
    assert {plan_of(four.unet).layers[n].w_bits for n in temporal} == {4}
    assert diffq.weight_bytes(four) < diffq.weight_bytes(pipe)


def test_allocate_then_convert_with_temporal_bits_equals_quantize():
    kwargs = tiny_call_kwargs(tiny_sd_pipeline())
    pipe = tiny_sd_pipeline()
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:2], num_inference_steps=2, progress=False, **kwargs)
    plan = diffq.allocate(pipe, stats, preset="w4a8", temporal_bits=4, progress=False)
    assert {plan.layers[n].w_bits for n in adapter_for(pipe.unet).temporal_layers(pipe.unet)} == {4}
    diffq.convert(pipe, plan, stats, progress=False)
    direct = quantize_tiny(tiny_sd_pipeline(), "w4a8", temporal_bits=4)
    assert plan_of(direct.unet) == plan
    assert np.array_equal(run_tiny(pipe), run_tiny(direct))


TEMPORAL_SUFFIXES = {  # the layers that read the timestep embedding, per architecture family
    "unet": ("time_emb_proj",),
    "pixart": ("adaln_single.linear",),
    "mmdit": ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"),
    "sana": ("time_embed.linear",),
    "dit": ("norm1.linear", "adaln_single.linear"),
    "wan": ("condition_embedder.time_proj",),
}


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_every_architecture_names_its_temporal_layers(arch):
    denoiser = denoiser_of(TINY_ARCHITECTURES[arch](0))
    adapter = adapter_for(denoiser)
    temporal = adapter.temporal_layers(denoiser)
    assert temporal and all(isinstance(m, nn.Linear) for m in temporal.values())
    assert all(name.endswith(TEMPORAL_SUFFIXES[adapter.name]) for name in temporal)
    _, kept = adapter.layers(denoiser)
    assert {n for n, reason in kept.items() if "reads the timestep" in reason} == set(temporal)


def test_temporal_bits_must_be_4_or_8():
    with pytest.raises(diffq.QuantizationInputError, match="temporal_bits=5.*use 8"):
        diffq.quantize(tiny_sd_pipeline(), "w4a8", temporal_bits=5, progress=False)


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    pipe = quantize_tiny(tiny_sd_pipeline(), "w8a16")
    diffq.save(pipe, tmp_path / "q")
    weights = tmp_path / "q" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(diffq.CheckpointError, match="truncated|unreadable"):
        diffq.load(tmp_path / "q")


@pytest.mark.parametrize("name", ["digits-sd", "digits-dit"])
def test_bundled_models_calibrate_with_their_own_call_arguments(name):
    # digits-dit is a 32 px PixArt: calibration must use its call defaults (no resolution binning).
    # (2 steps: diffusers' PixArt treats a single step as a one-step distilled schedule.)
    pipe = diffq.load(name)
    diffq.quantize(pipe, "w8a8", num_calibration_steps=2, progress=False)
    assert plan_of(denoiser_of(pipe)).layers
