"""Low-rank + 4-bit layers (SVDQuant-style)."""

import numpy as np
import pytest
import torch
from torch import nn

import diffq
from diffq.lowrank import split_low_rank
from diffq.modules import QuantizedLinear
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
