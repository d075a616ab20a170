"""GPTQ weight rounding (diffq.gptq): same grid as round-to-nearest, lower output error on the
calibration inputs, carried by the plan, saved and reloaded bit for bit."""

import numpy as np
import pytest
import torch
from allocations import ReturnedTensors
from torch import nn

import diffq
from diffq.gptq import SampledHessian, gptq_round, input_hessian, layer_hessian
from diffq.modules import QuantizedConv2d, QuantizedLinear, weight_format
from diffq.pipelines import denoiser_of
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import TINY_PROMPTS, run_tiny, tiny_call_kwargs, tiny_sd_pipeline
from diffq.plan import LayerConfig, QuantPlan


def correlated(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=generator) / channels**0.5
    return torch.randn(n, channels, generator=generator) @ mix + 0.1 * torch.randn(n, channels, generator=generator)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).pow(2).mean() / reference.pow(2).mean())


@pytest.mark.parametrize("config", [LayerConfig(4, 32, True, None), LayerConfig(4, None, True, None),
                                    LayerConfig(4, 32, False, None), LayerConfig(8, None, True, None)],
                         ids=["int4-g32", "int4-channel", "uint4-g32-asym", "int8-channel"])
@torch.no_grad()
def test_gptq_lowers_the_output_error_of_a_linear_layer(config):
    torch.manual_seed(0)
    layer, x = nn.Linear(128, 64), correlated(512, 128)
    reference = layer(x)
    nearest = QuantizedLinear.from_float(layer, config)
    gptq = QuantizedLinear.from_float(layer, config, hessian=input_hessian(x[:256]))  # fitted on half
    assert relative_error(gptq(x[256:]), reference[256:]) < 0.7 * relative_error(nearest(x[256:]), reference[256:])
    assert torch.equal(gptq.weight_scale, nearest.weight_scale)  # the same grid, other codes
    assert not torch.equal(gptq.qweight, nearest.qweight)


@torch.no_grad()
def test_gptq_lowers_the_output_error_of_a_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, padding=1)
    mix = torch.randn(32, 32) / 32**0.5
    x = torch.einsum("nchw,cd->ndhw", torch.randn(8, 32, 12, 12), mix)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 32)  # what calibration samples: one vector per pixel
    config = LayerConfig(4, 32, True, None)
    reference = conv(x)
    nearest = QuantizedConv2d.from_float(conv, config)
    gptq = QuantizedConv2d.from_float(conv, config, hessian=input_hessian(rows))
    assert relative_error(gptq(x), reference) < 0.7 * relative_error(nearest(x), reference)


def test_gptq_values_lie_on_the_grid_and_a_bad_hessian_is_refused():
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), correlated(256, 64)
    config = LayerConfig(4, 16, True, None)
    fmt = weight_format(config)
    from diffq.formats import compute_scales

    scale, zero = compute_scales(weight, fmt)
    rounded = gptq_round(weight, input_hessian(x), fmt, scale, zero)
    codes = rounded.reshape(16, 4, 16) / scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    with pytest.raises(ValueError, match="does not fit"):
        gptq_round(weight, input_hessian(x[:, :32]), fmt, scale, zero)


def test_gptq_factors_the_hessian_in_place_only_when_asked():
    """The Hessian is [in, in] (15,360² float64 = 1.9 GB in a Flux single block): overwriting it gives
    the same codes with no copy, and without ``overwrite_hessian`` the caller's matrix is left alone."""
    from diffq.formats import compute_scales

    torch.manual_seed(0)
    weight, x = torch.randn(32, 128), correlated(96, 128)  # fewer rows than inputs: damping matters
    x[:, :2] = 0  # inputs never seen
    fmt = weight_format(LayerConfig(4, 32, True, None))
    scale, zero = compute_scales(weight, fmt)
    hessian = input_hessian(x)
    kept = hessian.clone()
    copied = gptq_round(weight, hessian, fmt, scale, zero)
    assert torch.equal(hessian, kept)
    address = hessian.data_ptr()
    overwritten = gptq_round(weight, hessian, fmt, scale, zero, overwrite_hessian=True)
    assert torch.equal(overwritten, copied)
    assert hessian.data_ptr() == address and not torch.equal(hessian, kept)  # it now holds H⁻¹'s factor
    assert torch.allclose(torch.triu(hessian), hessian)


def _factor(blocks) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(rows, (start, 0)) for start, _, rows in blocks])


@pytest.mark.parametrize("taps", [1, 9], ids=["linear", "conv3x3"])
def test_a_sampled_hessian_gives_the_dense_factor_and_the_same_codes(taps):
    """Fewer sampled rows than inputs (calibration keeps 256): the Woodbury form's factor of H⁻¹ is
    the dense one to float64 rounding, and the rounded weight is the same, smoothing and unseen
    inputs included."""
    from diffq.formats import compute_scales
    from diffq.gptq import _dense_factor_blocks, _sampled_factor_blocks

    torch.manual_seed(0)
    x, smooth = correlated(48, 256), torch.rand(256) + 0.5
    x[:, 3] = 0  # an input never seen
    sampled, dense = layer_hessian(x, smooth), input_hessian(x, smooth)
    assert isinstance(sampled, SampledHessian) and sampled.shape == (256, 256)
    assert isinstance(layer_hessian(x[:, :32], smooth[:32]), torch.Tensor)  # enough rows: the dense matrix
    reference = _factor(_dense_factor_blocks(dense.clone(), 0.01, 32, True))
    assert float((_factor(_sampled_factor_blocks(sampled, 0.01, 32)) - reference).abs().max()) < 1e-10 * float(
        reference.abs().max())
    weight = torch.randn(24, 256 * taps)
    fmt = weight_format(LayerConfig(4, 32, True, None))
    scale, zero = compute_scales(weight, fmt)
    assert torch.equal(gptq_round(weight, sampled, fmt, scale, zero, taps=taps),
                       gptq_round(weight, dense, fmt, scale, zero, taps=taps))


def test_a_sampled_hessian_forms_no_inputs_squared_matrix():
    """The point of the sampled form: no tensor of in² elements (3.8 GB at Flux's 15,360 inputs)."""
    from diffq.formats import compute_scales

    torch.manual_seed(0)
    inputs = 1024
    weight, x = torch.randn(16, inputs), torch.randn(64, inputs)
    fmt = weight_format(LayerConfig(4, 64, True, None))
    scale, zero = compute_scales(weight, fmt)
    with ReturnedTensors() as seen:
        gptq_round(weight, layer_hessian(x), fmt, scale, zero)
    assert 0 < seen.largest_numel() < inputs * inputs // 8
    with ReturnedTensors() as dense:
        gptq_round(weight, input_hessian(x), fmt, scale, zero)
    assert dense.largest_numel() >= inputs * inputs  # the check can see one


def test_gptq_holds_one_weight_sized_buffer():
    """The rounding loop writes each block's codes back into its working copy of the weight and
    expands scales one block at a time: one float32 buffer of the weight's size (a Flux proj_out's
    is 189 MB), not three."""
    from diffq.formats import compute_scales

    torch.manual_seed(0)
    weight, x = torch.randn(1024, 256), torch.randn(64, 256)  # more outputs than inputs: H's factor is smaller
    fmt = weight_format(LayerConfig(4, 64, True, None))
    scale, zero = compute_scales(weight, fmt)
    hessian = layer_hessian(x)
    with ReturnedTensors() as seen:
        rounded = gptq_round(weight, hessian, fmt, scale, zero)
    assert seen.allocations_of_at_least(weight.numel()) == 1
    assert torch.equal(rounded, gptq_round(weight, input_hessian(x), fmt, scale, zero))  # same codes, dense


def test_the_plan_carries_gptq_and_stays_readable_without_it():
    nearest, gptq = LayerConfig(4, 64, True, 8), LayerConfig(4, 64, True, 8, w_round="gptq")
    assert "w_round" not in nearest.to_dict() and gptq.to_dict()["w_round"] == "gptq"
    plan = QuantPlan("p", {"a": nearest, "b": gptq})
    assert QuantPlan.from_json(plan.to_json()) == plan
    with pytest.raises(diffq.QuantizationInputError, match="w_round"):
        LayerConfig(w_round="best")


def test_quantize_with_gptq_rounding_saves_and_reloads_bit_for_bit(tmp_path):
    pipe = tiny_sd_pipeline()
    reference = run_tiny(pipe)
    nearest = diffq.quantize(tiny_sd_pipeline(), "w4a16", calibration=TINY_PROMPTS[:2], num_calibration_steps=2,
                             progress=False, weight_rounding="nearest", **tiny_call_kwargs(pipe))
    assert {c.w_round for c in plan_of(denoiser_of(nearest)).layers.values()} == {"nearest"}
    diffq.quantize(pipe, "w4a16", calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                   **tiny_call_kwargs(pipe))  # GPTQ is w4a16's default
    plan = plan_of(denoiser_of(pipe))
    assert {config.w_round for config in plan.layers.values()} == {"gptq"}
    images = run_tiny(pipe)
    assert np.isfinite(images).all() and not np.array_equal(images, run_tiny(nearest))
    assert np.mean((images - reference) ** 2) < 2 * np.mean((run_tiny(nearest) - reference) ** 2)
    diffq.save(pipe, tmp_path / "q")
    assert np.array_equal(run_tiny(diffq.load(tmp_path / "q")), images)
    with pytest.raises(diffq.QuantizationInputError, match="weight_rounding"):
        diffq.quantize(tiny_sd_pipeline(), "w4a16", weight_rounding="best")


def test_gptq_is_the_default_of_the_calibrated_4_bit_presets_only():
    rounding = {name: diffq.get_preset(name).layer.w_round for name in diffq.available_presets()}
    assert {n for n, r in rounding.items() if r == "gptq"} == {"w4a8", "w4a16", "w4a4"}
    assert rounding["w8a8"] == rounding["w4a8-rtn"] == rounding["mixed"] == "nearest"


def test_a_grouped_convolution_keeps_nearest_rounding():
    from diffq.layers import resolve_config

    gptq = LayerConfig(4, None, True, None, w_round="gptq")
    assert resolve_config(nn.Conv2d(8, 8, 3, groups=2), gptq).w_round == "nearest"
    assert resolve_config(nn.Conv2d(8, 8, 3), gptq).w_round == "gptq"
    assert resolve_config(nn.Linear(8, 8), gptq).w_round == "gptq"
