import pytest
import torch
from torch import nn

from diffq import kernels
from diffq.calibration import ActivationObserver, CalibrationStats
from diffq.context import timestep
from diffq.convert import resolve_config
from diffq.errors import QuantizationInputError
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
    assert not hasattr(q, "weight")
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (32, 64)  # two 4-bit codes per byte
    assert q.weight_scale.shape == (32, 2)
    assert set(dict(q.named_buffers())) == {"qweight", "weight_scale"}
    expected = 32 * 64 + 32 * 2 * 4 + 32 * 4  # codes + fp32 scales + fp32 bias
    assert weight_bytes(q) == expected


def test_dequantized_weight_matches_the_stored_codes():
    linear = nn.Linear(64, 16)
    q = QuantizedLinear.from_float(linear, LayerConfig(8, None, True, None))
    assert torch.allclose(q.dequantize_weight(), linear.weight, atol=float(linear.weight.abs().max()) / 127)


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


def test_dispatch_uses_registered_kernel_for_its_device(monkeypatch):
    calls = []

    def fake_kernel(x, *args, **kwargs):
        calls.append(x.device.type)
        return kernels.reference.quantized_linear(x, *args, **kwargs)

    monkeypatch.setitem(kernels._KERNELS["quantized_linear"], "cpu", fake_kernel)
    q = QuantizedLinear.from_float(nn.Linear(64, 8), LayerConfig(8, None, True, None))
    q(torch.randn(3, 64))
    assert calls == ["cpu"]
    monkeypatch.setitem(kernels._KERNELS["quantized_linear"], "cpu", None)
    monkeypatch.delitem(kernels._KERNELS["quantized_linear"], "cpu")
    assert kernels.backend_for("quantized_linear", torch.device("cpu")) is kernels.reference.quantized_linear


def test_observer_stats_equal_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    inputs = {0.0: [torch.randn(5, 16), torch.randn(3, 16)], 500.0: [torch.randn(4, 16) * 3]}
    observer = ActivationObserver({"0": model[0], "2": model[2]})
    with observer.observe() as stats:
        for t, batches in inputs.items():
            with timestep(t):
                for x in batches:
                    model(x)
    assert sorted(stats.layers["0"]) == [0.0, 500.0]
    for t, batches in inputs.items():
        x = torch.cat(batches)
        assert torch.equal(stats.layers["0"][t].channel_min, x.amin(0))
        assert torch.equal(stats.layers["0"][t].channel_max, x.amax(0))
        hidden = torch.relu(model[0](x))
        assert torch.allclose(stats.layers["2"][t].channel_max, hidden.amax(0))
    assert stats.absmax("0") == pytest.approx(float(torch.cat(sum(inputs.values(), [])).abs().max()))
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_calibration_stats_save_load_merge(tmp_path):
    a = CalibrationStats()
    b = CalibrationStats()
    for stats, scale in ((a, 1.0), (b, 2.0)):
        observer = ActivationObserver({"lin": nn.Linear(8, 2)})
        observer.stats = stats
        with observer.observe(), timestep(10.0):
            observer.layers["lin"](torch.linspace(-scale, scale, 8).reshape(1, 8))
    a.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStats.load(tmp_path / "stats.safetensors")
    assert torch.equal(loaded.layers["lin"][10.0].channel_max, a.layers["lin"][10.0].channel_max)
    merged = loaded.merge(b)
    assert merged.absmax("lin") == pytest.approx(2.0)
    assert merged.layers["lin"][10.0].count == 2
    assert a.absmax("lin") == pytest.approx(1.0)  # merge does not modify its inputs


def test_plan_round_trips_through_json():
    plan = QuantPlan("w4a8", {"a.b": LayerConfig(4, 64, True, 8, "static")}, {"conv_in": "first layer"})
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert "conv_in" in plan.table() and "int4" in plan.table()
