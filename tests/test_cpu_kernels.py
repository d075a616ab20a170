"""The CPU kernels (``torch._int_mm``) against the reference function, within the error bound of
``tests/kernel_cases.py``; their activation codes are the reference's, bit for bit."""

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import CASES, UNIT, expected_and_tolerance, make_inputs
from torch import nn

from diffq.kernels import cpu, dispatch, kernel_codes, pack, reference, unpack, unsupported_reason
from diffq.modules import QuantizedConv2d, QuantizedLinear
from diffq.plan import LayerConfig

# Every linear case of the Triton tests, plus the awkward shapes: one token, one output, a weight
# group that does not divide the activation group, a bf16 input with static scales.
LINEAR_CASES = [
    *CASES,
    replace(CASES[1], name="w4a8-static-one-token", lead=(1,)),
    replace(CASES[0], name="w4a8-g64-one-output", n=1),
    replace(CASES[2], name="w4a4-g32-actg64", w_group=32, rank=0),
    replace(CASES[1], name="w4a8-g64-static-bf16-3d", lead=(2, 5), w_group=64, dtype=torch.bfloat16),
    replace(CASES[3], name="w2a8-ch-dyn", w_bits=2, act_bits=8),
    replace(CASES[3], name="w3a8-ch-dyn-k-odd", w_bits=3, k=120, act_bits=8),
    replace(CASES[0], name="w4a8-g64-wide-output-chunked", lead=(5,), n=1100),  # > 2 column chunks
    replace(CASES[2], name="w4a4-g64-wide-output-chunked", lead=(5,), n=1100, dtype=torch.float32),
]


def _run_linear(case):
    x, qweight, w_scale, w_zero, kw = make_inputs(case)
    codes = kernel_codes(qweight, w_scale, w_zero, w_bits=case.w_bits, w_code_offset=kw["w_code_offset"], cols=case.k)
    return x, qweight, w_scale, w_zero, kw, codes


@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if not (c.w_bits == 8 and c.asym)], ids=lambda c: c.name)
def test_cpu_linear_matches_float64_reference(case):
    x, qweight, w_scale, w_zero, kw, codes = _run_linear(case)
    assert cpu.linear_unsupported_reason(x, qweight, w_scale, w_zero, codes=codes, **kw) is None
    y = dispatch.quantized_linear(x, qweight, w_scale, w_zero, codes=codes, **kw)
    assert y.shape == (*case.lead, case.n) and y.dtype == x.dtype
    expected, tol = expected_and_tolerance(x, qweight, w_scale, w_zero, kw)
    # The CPU kernel keeps the low-rank branch in float32, as the reference does.
    worst = float(((y.reshape(-1, case.n).double() - expected).abs() / tol).max())
    assert worst <= 1.0, f"error exceeds the bound by a factor {worst:.3g}"
    unprepared = cpu.quantized_linear(x, qweight, w_scale, w_zero, **kw)  # codes made for the call
    assert torch.equal(unprepared, y)


def test_cpu_activation_codes_are_the_references_bit_for_bit():
    x = torch.randn(33, 192) * torch.logspace(-3, 2, 192)
    for bits, group in ((8, None), (4, 64), (8, 48)):
        q, scale, width = cpu._quantize_rows(x, bits, group)
        ref_q, ref_s = reference.quantize_activations(x, bits, None, group)
        assert torch.equal(q.float(), ref_q)
        assert torch.equal(scale.repeat_interleave(width, dim=1), ref_s.expand_as(x))
    static = torch.tensor(0.01)
    assert torch.equal(cpu._quantize_static(x, 8, static).float(), reference.quantize_activations(x, 8, static)[0])


def test_per_tensor_weight_scales_over_column_chunks():
    x = torch.randn(3, 128)
    qweight = pack(torch.randint(0, 16, (1100, 128), dtype=torch.uint8), 4)
    w_scale = torch.full((1, 2), 0.01)  # one scale per group for every output row
    kw = dict(w_bits=4, w_code_offset=8, in_features=128, act_bits=8, act_group_size=None)
    y = dispatch.quantized_linear(x, qweight, w_scale, None, **kw)
    assert torch.allclose(y, reference.quantized_linear(x, qweight, w_scale, None, **kw), rtol=1e-5, atol=1e-5)


def test_eight_bit_asymmetric_weights_run_the_reference_and_say_why():
    case = next(c for c in CASES if c.w_bits == 8 and c.asym)
    x, qweight, w_scale, w_zero, kw, codes = _run_linear(case)
    assert codes is None
    assert "asymmetric" in unsupported_reason("quantized_linear", x, qweight, w_scale, w_zero, **kw)
    y = dispatch.quantized_linear(x, qweight, w_scale, w_zero, **kw)
    assert torch.equal(y, reference.quantized_linear(x, qweight, w_scale, w_zero, **kw))


def test_kernel_codes_are_the_signed_weight_values():
    codes = torch.randint(0, 16, (6, 128), dtype=torch.uint8)
    zero = torch.randint(0, 16, (6, 2), dtype=torch.uint8)
    values = kernel_codes(pack(codes, 4), torch.ones(6, 2), zero, w_bits=4, w_code_offset=0, cols=128)
    expected = unpack(pack(codes, 4), 4, 128).int().reshape(6, 2, 64) - zero.int().unsqueeze(-1)
    assert values.dtype == torch.int8 and values.shape == (6, 128)
    assert torch.equal(values.int(), expected.reshape(6, 128))


@dataclass(frozen=True)
class ConvCase:
    name: str
    c_in: int
    c_out: int
    kernel: int
    w_bits: int = 8
    w_group: int | None = None
    act: str | None = "static"  # "static", "dynamic" or None (weight-only)
    act_group: int | None = None
    split: int | None = None
    stride: int = 1
    padding: int | str = 1
    dilation: int = 1
    groups: int = 1
    rank: int = 0
    bias: bool = True
    smooth: bool = False
    size: tuple[int, int] = (7, 9)
    dtype: torch.dtype = torch.float32


CONV_CASES = [
    ConvCase("w8a8-3x3-static", 16, 12, 3),
    ConvCase("w8a8-3x3-static-split", 16, 12, 3, split=6),
    ConvCase("w8a8-3x3-stride2-split", 16, 12, 3, split=10, stride=2, size=(8, 9)),
    ConvCase("w8a16-3x3", 16, 12, 3, act=None),
    ConvCase("w4a8-3x3-g48-static-split", 16, 12, 3, w_bits=4, w_group=48, split=6),
    ConvCase("w4a8-3x3-stride2-odd", 8, 12, 3, w_bits=4, w_group=24, stride=2, size=(9, 7)),
    ConvCase("w8a8-3x3-dilation2-same", 8, 12, 3, padding="same", dilation=2),
    ConvCase("w8a8-3x3-valid-nobias", 8, 5, 3, padding="valid", bias=False),
    ConvCase("w8a8-1x1-dynamic-split", 16, 12, 1, act="dynamic", split=10, padding=0),
    ConvCase("w4a4-1x1-dynamic-g8", 16, 12, 1, w_bits=4, w_group=8, act="dynamic", act_group=8, padding=0),
    ConvCase("w4a4-3x3-r4-smooth", 16, 12, 3, w_bits=4, w_group=48, rank=4, smooth=True),
    ConvCase("w4a16-3x3-g48", 16, 12, 3, w_bits=4, w_group=48, act=None),
    ConvCase("w8a8-3x3-bf16", 16, 12, 3, dtype=torch.bfloat16),
    ConvCase("w8a8-3x3-one-pixel", 16, 1, 3, size=(1, 1)),
]


def _conv_layer(case: ConvCase) -> tuple[QuantizedConv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(case.c_in, case.c_out, case.kernel, case.stride, case.padding, case.dilation, case.groups,
                     bias=case.bias)
    config = LayerConfig(
        w_bits=case.w_bits, w_group_size=case.w_group, a_bits=None if case.act is None else (4 if "a4" in case.name else 8),
        a_mode="dynamic" if case.act == "dynamic" else "static", a_group_size=case.act_group, a_split=case.split,
        smooth_alpha=0.5 if case.smooth else None, rank=case.rank,
    )
    smooth = torch.rand(case.c_in) + 0.5 if case.smooth else None
    layer = QuantizedConv2d.from_float(conv, config, smooth=smooth)
    if layer.act_scale is not None:
        layer.set_activation_scale(torch.tensor([[2.0, 3.0]]) if case.split else 2.5)
    return layer.to(case.dtype), torch.randn(2, case.c_in, *case.size).to(case.dtype)


def _conv_reference64(layer: QuantizedConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference convolution in float64 on the reference's float32 activation codes, and its bound."""
    x32 = x.float()
    if layer.smooth is not None:
        x32 = x32 / layer.smooth.float().reshape(1, -1, 1, 1)
    geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    config = layer.config
    a = x32 if config.a_bits is None else reference._fake_quantize_channels(
        x32, config.a_bits, layer.current_act_scale(), (config.a_split,) if config.a_split else (), config.a_group_size
    )
    w64 = layer.dequantize_weight().double().reshape(layer.weight_shape)
    y = F.conv2d(a.double(), w64, **geometry)
    mag = F.conv2d(a.double().abs(), w64.abs(), **geometry)
    if layer.lowrank_down is not None:
        down = layer.lowrank_down.double().t().reshape(-1, *layer.weight_shape[1:])
        up = layer.lowrank_up.double()
        y = y + torch.einsum("nrhw,ro->nohw", F.conv2d(x32.double(), down, **geometry), up)
        mag = mag + torch.einsum("nrhw,ro->nohw", F.conv2d(x32.double().abs(), down.abs(), **geometry), up.abs())
    if layer.bias is not None:
        y = y + layer.bias.double().reshape(1, -1, 1, 1)
        mag = mag + layer.bias.double().abs().reshape(1, -1, 1, 1)
    cols = layer.cols + config.rank + 8
    u_out = UNIT[x.dtype]
    return y, u_out * y.abs() + (1 + u_out) * cols * 2.0**-24 * mag


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: c.name)
def test_cpu_conv2d_matches_float64_reference(case):
    layer, x = _conv_layer(case)
    assert layer.kernel_codes is not None
    with torch.no_grad():
        kwargs = dict(codes=layer.kernel_codes, w_bits=case.w_bits, act_bits=layer.config.a_bits,
                      weight_shape=layer.weight_shape, groups=1, stride=layer.stride, padding=layer.padding,
                      act_scale=layer.current_act_scale())
        assert unsupported_reason("quantized_conv2d", x, layer.qweight, layer.weight_scale, None, **kwargs) is None
        y = layer(x)
        expected, tol = _conv_reference64(layer, x)
    assert y.shape == expected.shape and y.dtype == x.dtype and y.is_contiguous()
    worst = float(((y.double() - expected).abs() / tol).max())
    assert worst <= 1.0, f"error exceeds the bound by a factor {worst:.3g}"


@pytest.mark.parametrize(
    "case, reason",
    [
        (ConvCase("w8a8-3x3-dynamic", 8, 8, 3, act="dynamic"), "per-pixel"),
        (ConvCase("w8a8-3x3-groups2", 8, 8, 3, groups=2), "groups=2"),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_unsupported_convolutions_run_the_reference_and_say_why(case, reason, monkeypatch):
    layer, x = _conv_layer(case)
    kwargs = dict(codes=layer.kernel_codes, w_bits=8, act_bits=8, weight_shape=layer.weight_shape,
                  groups=layer.groups, stride=layer.stride, padding=layer.padding, act_scale=layer.current_act_scale())
    assert reason in unsupported_reason("quantized_conv2d", x, layer.qweight, layer.weight_scale, None, **kwargs)
    with torch.no_grad():
        y = layer(x)
        monkeypatch.setenv("DIFFQ_KERNELS", "reference")
        assert torch.equal(y, layer(x))


def test_diffq_kernels_reference_forces_the_reference(monkeypatch):
    layer = QuantizedLinear.from_float(nn.Linear(64, 16), LayerConfig(4, 32, True, 8, "dynamic"))
    x = torch.randn(5, 64)
    calls = []
    monkeypatch.setattr(cpu, "quantized_linear", lambda *a, **k: calls.append(1) or reference.quantized_linear(*a, **{
        n: v for n, v in k.items() if n != "codes"}))
    with torch.no_grad():
        layer(x)
        assert calls == [1]
        monkeypatch.setenv("DIFFQ_KERNELS", "reference")
        assert unsupported_reason("quantized_linear", x) == "DIFFQ_KERNELS=reference"
        layer(x)
    assert calls == [1]


def test_the_cpu_layout_is_made_once_and_follows_the_device(monkeypatch):
    layer = QuantizedLinear.from_float(nn.Linear(64, 16), LayerConfig(4, 32, True, 8, "dynamic"))
    assert layer.kernel_codes is not None and "kernel_codes" not in layer.state_dict()
    made = []
    original = cpu.kernel_codes
    monkeypatch.setattr(cpu, "kernel_codes", lambda *a, **k: made.append(1) or original(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(4, 64))
    assert made == []  # never per call
    layer.to("meta")
    assert layer.kernel_codes is None  # not carried to another device
    fresh = QuantizedLinear(64, 16, layer.config)
    fresh.load_state_dict(QuantizedLinear.from_float(nn.Linear(64, 16), layer.config).state_dict())
    assert fresh.kernel_codes is not None and torch.equal(
        fresh.kernel_codes, original(fresh.qweight, fresh.weight_scale, None, w_bits=4, w_code_offset=8, cols=64)
    )
