import pytest
import torch
from torch import nn

from diffq.errors import QuantizationInputError
from diffq.layers import resolve_config
from diffq.modules import QuantizedConv2d, QuantizedLinear, weight_bytes
from diffq.plan import LayerConfig, QuantPlan


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize(
    "config, bound",
    [
        (LayerConfig(8, None, True, None), 1e-4),
        (LayerConfig(8, None, True, 8, "dynamic"), 1e-3),
        (LayerConfig(4, 64, True, 8, "dynamic"), 2e-2),
        (LayerConfig(4, 64, False, None), 2e-2),
        (LayerConfig(4, 32, True, 4, "dynamic", a_group_size=32), 8e-2),
        (LayerConfig(3, 64, True, None), 6e-2),
    ],
    ids=lambda v: v.label if isinstance(v, LayerConfig) else "",
)
def test_quantized_linear_tracks_float(config, bound):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    x = torch.randn(2, 7, 128)
    q = QuantizedLinear.from_float(linear, config)
    assert rel_error(q(x), linear(x)) < bound


def test_storage_is_packed_integers_not_floats():
    linear = nn.Linear(128, 32)
    q = QuantizedLinear.from_float(linear, LayerConfig(4, 64, True, 8, "dynamic"))
    assert "weight" not in dict(q.named_parameters()) and "weight" not in q.state_dict()
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (32, 64)  # two 4-bit codes per byte
    assert q.weight_scale.shape == (32, 2)
    assert set(dict(q.named_buffers())) == {"qweight", "weight_scale", "kernel_codes"}
    assert set(q.state_dict()) == {"qweight", "weight_scale", "bias"}  # the CPU layout is derived, not saved
    expected = 32 * 64 + 32 * 2 * 4 + 32 * 4  # codes + fp32 scales + fp32 bias
    assert weight_bytes(q) == expected


def test_dequantized_weight_matches_the_stored_codes():
    linear = nn.Linear(64, 16)
    q = QuantizedLinear.from_float(linear, LayerConfig(8, None, True, None))
    assert torch.allclose(q.dequantize_weight(), linear.weight, atol=float(linear.weight.abs().max()) / 127)


def test_weight_view_is_the_effective_float_weight():
    torch.manual_seed(0)
    linear = nn.Linear(128, 32)
    smooth = torch.rand(128) + 0.5
    config = LayerConfig(4, 64, True, None, smooth_alpha=0.5, rank=8)
    q = QuantizedLinear.from_float(linear, config, smooth=smooth)
    assert q.weight.shape == linear.weight.shape and q.weight.dtype == linear.weight.dtype
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.weight, q.bias), atol=1e-4)
    conv = QuantizedConv2d.from_float(nn.Conv2d(8, 16, 3), LayerConfig(8, None, True, None))
    assert conv.weight.shape == (16, 8, 3, 3)


@pytest.mark.parametrize("groups", [1, 2])
def test_quantized_conv2d_tracks_float(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 32, 9, 9)
    config = resolve_config(conv, LayerConfig(4, 64, True, 8, "dynamic"))
    q = QuantizedConv2d.from_float(conv, config)
    assert q(x).shape == conv(x).shape
    assert rel_error(q(x), conv(x)) < 2e-2


def test_static_activation_scale_clips_outside_calibrated_range():
    linear = nn.Linear(64, 8, bias=False)
    q = QuantizedLinear.from_float(linear, LayerConfig(8, None, True, 8, "static"))
    q.set_activation_scale(1.0)
    weight = q.dequantize_weight()
    small = torch.full((1, 64), 0.5)
    on_grid = torch.full((1, 64), round(0.5 * 127) / 127)
    assert torch.allclose(q(small), on_grid @ weight.t(), atol=1e-5)
    # 4.0 is outside the calibrated range [-1, 1]: it saturates at 1.0.
    assert torch.allclose(q(torch.full((1, 64), 4.0)), torch.ones(1, 64) @ weight.t(), atol=1e-5)
    with pytest.raises(QuantizationInputError):
        q.set_activation_scale(float("nan"))


def test_layers_call_the_diffq_op_of_their_device(monkeypatch):
    from diffq.kernels import cpu

    calls = []
    original = cpu.quantized_linear

    def spy(x, *args, **kwargs):
        calls.append((x.device.type, kwargs["codes"] is not None))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(cpu, "quantized_linear", spy)
    q = QuantizedLinear.from_float(nn.Linear(64, 8), LayerConfig(8, None, True, None))
    q(torch.randn(3, 64))
    assert calls == [("cpu", True)]  # through torch.ops.diffq, with the layout prepared at conversion
    graph = torch.fx.experimental.proxy_tensor.make_fx(q)(torch.randn(3, 64))
    assert any(node.target == torch.ops.diffq.quantized_linear.default for node in graph.graph.nodes)


def test_plan_round_trips_through_json():
    plan = QuantPlan("w4a8", {"a.b": LayerConfig(4, 64, True, 8, "static")}, {"conv_in": "first layer"})
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert "conv_in" in plan.table() and "int4" in plan.table()
