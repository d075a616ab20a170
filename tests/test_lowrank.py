"""Low-rank + 4-bit layers (SVDQuant-style)."""

import numpy as np
import pytest
import torch
from torch import nn

import diffq
from diffq.layers import resolve_config
from diffq.lowrank import split_low_rank
from diffq.modules import QuantizedConv2d, QuantizedLinear
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import TINY_PROMPTS, run_tiny, tiny_call_kwargs, tiny_pixart_pipeline
from diffq.plan import LayerConfig


def test_split_reconstructs_the_weight_and_takes_the_top_directions():
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    down, up, residual = split_low_rank(weight, 8)
    assert down.shape == (96, 8) and up.shape == (8, 48)
    assert torch.allclose((down @ up).t() + residual, weight, atol=1e-5)
    singular = torch.linalg.svdvals(weight)
    assert torch.linalg.svdvals(residual)[0] == pytest.approx(float(singular[8]), rel=1e-4)


def test_randomized_svd_for_large_weights_is_close_to_exact():
    torch.manual_seed(0)
    low = torch.randn(1100, 16) @ torch.randn(16, 1000)
    weight = low + 0.01 * torch.randn(1100, 1000)  # above the exact-SVD size limit
    _down, _up, residual = split_low_rank(weight, 16)
    assert residual.norm() < 0.02 * weight.norm()


def test_branch_absorbs_weight_outliers():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight[:, :4] *= 30
    x = torch.randn(64, 256)
    errors = {}
    for rank in (0, 32):
        q = QuantizedLinear.from_float(linear, LayerConfig(4, 64, True, 4, "dynamic", a_group_size=64, rank=rank))
        with torch.no_grad():
            errors[rank] = float((q(x) - linear(x)).pow(2).mean() / linear(x).pow(2).mean())
    assert errors[32] < errors[0] / 20
    assert q.lowrank_down.shape == (256, 32) and q.lowrank_up.shape == (32, 128)


def _quantize(pipe, preset, **kwargs):
    return diffq.quantize(pipe, preset, calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                          **tiny_call_kwargs(pipe), **kwargs)


def psnr(a, b):
    return 10 * np.log10(1 / np.mean((a - b) ** 2))


def test_w4a4_low_rank_beats_no_branch_and_rank_is_overridable(tmp_path):
    reference = run_tiny(tiny_pixart_pipeline())
    scores = {}
    for rank in (0, None, 64):
        pipe = _quantize(tiny_pixart_pipeline(), "w4a4", rank=rank)
        ranks = {cfg.rank for cfg in plan_of(pipe.transformer).layers.values()}
        if rank == 0:
            assert ranks == {0}
        elif rank is None:
            assert ranks == {32}  # the preset's default
        else:
            assert max(ranks) == 64 and ranks <= {64}  # capped at the layer width where narrower
        scores[rank] = psnr(run_tiny(pipe), reference)
    assert scores[None] > scores[0] + 3
    diffq.save(pipe, tmp_path / "q")
    assert np.array_equal(run_tiny(diffq.load(tmp_path / "q")), run_tiny(pipe))


def test_bad_rank_is_a_clear_error():
    with pytest.raises(diffq.DiffQError, match="rank"):
        diffq.quantize(tiny_pixart_pipeline(), "w4a4", rank=-1)


def _outlier_conv(groups: int = 1) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 48, 3, padding=1, groups=groups)
    with torch.no_grad():
        conv.weight[:, :2] *= 30  # outlier input channels
    return conv


def test_conv_branch_and_smoothing_compute_the_layer_they_store():
    """Without activation quantization a convolution with smoothing and a branch is exactly the
    convolution by its materialized ``weight``: residual codes + branch, smoothing undone."""
    conv = _outlier_conv()
    config = LayerConfig(4, 64, True, None, smooth_alpha=0.5, rank=8)
    smooth = torch.rand(64) + 0.5
    q = QuantizedConv2d.from_float(conv, config, smooth=smooth)
    assert q.smooth.shape == (64,) and q.lowrank_down.shape == (64 * 9, 8) and q.lowrank_up.shape == (8, 48)
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        expected = nn.functional.conv2d(x.double(), q.weight.double(), q.bias.double(), padding=1)
        assert torch.allclose(q(x).double(), expected, atol=1e-4)
        assert (q.weight - conv.weight).pow(2).mean() < 0.05 * conv.weight.pow(2).mean()


def test_conv_branch_absorbs_weight_outliers_at_4_bits():
    conv = _outlier_conv()
    x = torch.randn(2, 64, 8, 8)
    errors = {}
    for rank in (0, 32):
        q = QuantizedConv2d.from_float(conv, LayerConfig(4, 64, True, 4, "dynamic", a_group_size=64, rank=rank))
        with torch.no_grad():
            errors[rank] = float((q(x) - conv(x)).pow(2).mean() / conv(x).pow(2).mean())
    assert errors[32] < errors[0] / 10


def test_grouped_convolutions_get_no_branch_or_smoothing():
    conv = _outlier_conv(groups=4)
    assert resolve_config(conv, LayerConfig(4, 64, True, 4, "dynamic", a_group_size=64, rank=32)).rank == 0
    with pytest.raises(diffq.DiffQError, match="groups=1"):
        QuantizedConv2d.from_float(conv, LayerConfig(4, 16, True, None, smooth_alpha=0.5), smooth=torch.ones(64))


def test_conv_activations_are_quantized_per_pixel_and_channel_group():
    from diffq.kernels.reference import _fake_quantize_channels, fake_quantize_activations

    x = torch.randn(2, 32, 5, 3)
    x[:, 3] *= 50  # an outlier channel only spoils its own group of 16
    got = _fake_quantize_channels(x, 4, None, (), group_size=16)
    pixels = x.movedim(1, -1).reshape(-1, 32)
    expected = torch.cat([fake_quantize_activations(pixels[:, :16], 4), fake_quantize_activations(pixels[:, 16:], 4)], 1)
    assert torch.equal(got, expected.reshape(2, 5, 3, 32).movedim(-1, 1))
    assert not torch.equal(got, _fake_quantize_channels(x, 4, None, ()))


def test_w4a4_puts_the_branch_on_unet_convolutions_and_round_trips(tmp_path):
    from diffq.pipelines.testing import tiny_sd_pipeline

    reference = run_tiny(tiny_sd_pipeline())
    scores = {}
    for rank in (0, None):
        pipe = _quantize(tiny_sd_pipeline(), "w4a4", rank=rank)
        plan = plan_of(pipe.unet)
        convs = [n for n in plan.layers if isinstance(pipe.unet.get_submodule(n), QuantizedConv2d)]
        assert convs and all((plan.layers[n].rank > 0) == (rank is None) for n in convs)
        scores[rank] = psnr(run_tiny(pipe), reference)
    assert scores[None] > scores[0]
    diffq.save(pipe, tmp_path / "q")
    assert np.array_equal(run_tiny(diffq.load(tmp_path / "q")), run_tiny(pipe))
