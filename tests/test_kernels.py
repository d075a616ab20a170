"""Triton kernels against the reference function, run on CPU by the Triton interpreter.

The reference (:func:`diffq.kernels.reference.quantized_linear`) defines what every kernel
computes. Here it is recomputed in float64, with one exception: the quantized activations and
their scales are taken from the float32 reference, because its float32 rounding decisions are
part of the definition (the kernels reproduce them bit for bit, which is tested separately).

Error bounds (``tolerance`` below), per output element, with ``E`` the float64 value:

* integer products and sums are exact (int32 accumulator, or integer-valued fp16/bf16/fp32
  operands with a float32 accumulator); what is left is float32 rounding in converting partial
  sums, multiplying scales and adding tiles, bias and the low-rank branch: at most
  ``gamma * (|q s| @ |W|^T + (|x| @ |L1|) @ |L2| + |bias|)`` with ``gamma = (K + r + 8) * 2**-24``
  (the standard worst-case bound ``n u`` for ``n`` float32 operations on each path);
* the low-rank branch rounds ``x / smooth`` to ``L1``'s dtype and ``x L1`` to ``L2``'s dtype for
  16-bit tensor cores: at most ``2 u_lr (|x| @ |L1|) @ |L2|`` (``u_lr``: that dtype's unit
  roundoff, 2**-11 fp16, 2**-8 bf16 (2**-7 in the interpreter, which truncates), 0 for
  float32 operands);
* the weight-only kernel with ``smooth`` rounds ``x / smooth`` back to ``x``'s dtype: at most
  ``u_x |x / smooth| @ |W|^T``;
* the result is rounded to ``x``'s dtype (as the reference does): ``u_out |E|`` more.
"""

import os

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton or the kernels module is imported

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_cases import (  # noqa: E402,F401
    CASES,
    IMPLICIT_GEMM_CASES,
    UNIT,
    Case,
    ConvCase,
    conv_expected_and_tolerance,
    conv_inputs,
    expected_and_tolerance,
    make_inputs,
)

from diffq.kernels import dispatch as kernels  # noqa: E402
from diffq.kernels import pack, reference  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed, so the Triton kernels cannot be tested")
triton_ops = pytest.importorskip(
    "diffq.kernels.triton_ops", reason="the Triton kernels module does not import (triton too old or broken)"
)
if not triton_ops.INTERPRET:  # pragma: no cover - imported by an earlier module without the flag
    pytest.skip("diffq.kernels.triton_ops was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)



def _restore_interpret_flag() -> None:
    if _INTERPRET_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


# The interpreted kernels are bound to ``triton_ops`` above. Outside this module the session is
# left as it was: kernels defined later (torch.compile on a GPU) compile normally, and the CUDA
# dispatch imports its own, compiled copy of the module. Triton still reads the flag while an
# interpreted kernel runs (lazy imports), so the fixture below sets it for this module's tests.
sys.modules.pop("diffq.kernels.triton_ops")
_restore_interpret_flag()


@pytest.fixture(autouse=True, scope="module")
def _interpreter_flag():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret_flag()

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_quantized_linear_matches_float64_reference(case):
    x, qweight, w_scale, w_zero, kw = make_inputs(case)
    assert triton_ops.unsupported_reason(x, qweight, w_scale, w_zero, **kw) is None
    y = triton_ops.quantized_linear_triton(x, qweight, w_scale, w_zero, **kw)
    assert y.shape == (*case.lead, case.n) and y.dtype == x.dtype
    expected, tol = expected_and_tolerance(x, qweight, w_scale, w_zero, kw)
    err = (y.reshape(-1, case.n).double() - expected).abs()
    worst = float((err / tol).max())
    assert worst <= 1.0, f"error exceeds the bound by a factor {worst:.3g}"


@pytest.mark.parametrize(
    "bits, group, static, rank, smooth, dtype",
    [
        (8, None, False, 16, True, torch.float16),  # dynamic per token: two passes over the row tile
        (4, 64, False, 0, False, torch.float32),  # dynamic per token group
        (8, None, True, 16, True, torch.bfloat16),  # static scale
        (None, None, False, 16, True, torch.float16),  # weight-only layers: low-rank only
    ],
)
def test_activation_kernel_is_bit_exact(bits, group, static, rank, smooth, dtype):
    M, K = 37, 192
    x = torch.randn(M, K).to(dtype)
    sm = (torch.rand(K) + 0.5).to(dtype) if smooth else None
    scale = torch.tensor(0.02) if static else None
    down = (torch.randn(K, rank) / K**0.5).to(dtype) if rank else None
    q, s, t = triton_ops.act_quant_lowrank(x, bits, act_scale=scale, group_size=group, smooth=sm, lowrank_down=down)
    xs32 = x.float() if sm is None else x.float() / sm.float()
    if bits is None:
        assert q is None and s is None
    else:  # same fp32 divisions, round half to even and clamp as the reference: identical codes
        q_ref, s_ref = reference.quantize_activations(xs32, bits, scale, group)
        assert torch.equal(q.float(), q_ref)
        if not static:
            assert torch.equal(s.repeat_interleave(K // s.shape[1], dim=1), s_ref.expand(M, K))
    if rank:  # x / smooth rounded to L1's dtype, float32 accumulation
        xs64 = x.double() if sm is None else x.double() / sm.double()
        mag = xs64.abs() @ down.double().abs()
        tol = (UNIT[dtype] + (K + 8) * 2.0**-24) * mag
        assert ((t.double() - xs64 @ down.double()).abs() <= tol).all()
    else:
        assert t is None


def test_activation_rounding_ties_to_even_and_clamps():
    ties = torch.arange(-8, 8, dtype=torch.float32) + 0.5  # every .5 tie, both signs
    x = torch.cat([ties, torch.tensor([300.0, -300.0, 127.49, -128.51]), torch.zeros(44)]).reshape(1, 64)
    x = x.expand(16, 64).contiguous()
    q, _, _ = triton_ops.act_quant_lowrank(x, 8, act_scale=torch.tensor(1.0))
    assert torch.equal(q.float(), torch.round(x).clamp(-128, 127))


@pytest.mark.parametrize("w_bits, asym", [(4, False), (8, True)])
def test_integer_gemm_is_exact(w_bits, asym):
    """Unit scales and integer activations: the output is the exact integer matrix product."""
    M, N, K = 20, 40, 256
    x = torch.randint(-128, 128, (M, K)).float()
    codes = torch.randint(0, 2**w_bits, (N, K), dtype=torch.uint8)
    zero = torch.randint(0, 2**w_bits, (N, 4), dtype=torch.uint8) if asym else None
    offset = 0 if asym else 2 ** (w_bits - 1)
    kw = dict(w_bits=w_bits, w_code_offset=offset, in_features=K, act_bits=8, act_scale=torch.tensor(1.0))
    y = triton_ops.quantized_linear_triton(x, pack(codes, w_bits), torch.ones(N, 4), zero, **kw)
    w = codes.long() - offset - (0 if zero is None else zero.long().repeat_interleave(K // 4, dim=1))
    assert torch.equal(y.long(), x.long() @ w.t())  # |y| < 2**24: exact in float32


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(w_bits=2), "2-bit weights"),
        (dict(w_bits=3), "3-bit weights"),
        (dict(act_group_size=24), "activation group 24"),
        (dict(act_bits=16), "16-bit activations"),
    ],
)
def test_unsupported_combinations_run_the_reference(change, reason):
    K, N = 96, 24
    bits = change.get("w_bits", 4)
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
    qweight, w_scale = pack(codes, bits), torch.rand(N, 1) + 0.5
    kw = dict(w_bits=bits, w_code_offset=2 ** (bits - 1), in_features=K, act_bits=8, act_group_size=None)
    kw.update(change)
    x = torch.randn(5, K)
    assert reason in (triton_ops.unsupported_reason(x, qweight, w_scale, None, **kw) or "")
    y = triton_ops.quantized_linear_triton(x, qweight, w_scale, None, **kw)
    assert torch.equal(y, reference.quantized_linear(x, qweight, w_scale, None, **kw))


def test_cpu_tensors_outside_the_interpreter_run_the_reference(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    x, qweight, w_scale, w_zero, kw = make_inputs(CASES[0])
    assert "cpu" in triton_ops.unsupported_reason(x, qweight, w_scale, w_zero, **kw)


def test_ops_are_registered_with_a_kernel_per_device():
    """One ``diffq::`` op per layer type, dispatched by PyTorch: CPU and CUDA kernels, the
    reference for every other device, a fake implementation for tracing."""
    for name in ("quantized_linear", "quantized_conv2d"):
        op = getattr(torch.ops.diffq, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("diffq::quantized_linear", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("diffq::quantized_conv2d", "CUDA")
    x, qweight, w_scale, w_zero, kw = make_inputs(CASES[1])
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = kernels.quantized_linear(mode.from_tensor(x), mode.from_tensor(qweight), mode.from_tensor(w_scale),
                                        None, **{k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in kw.items()})
    assert fake.shape == (*CASES[1].lead, CASES[1].n)
    meta = kernels.quantized_linear(x.to("meta"), qweight.to("meta"), w_scale.to("meta"), None,
                                    **{k: v.to("meta") if torch.is_tensor(v) else v for k, v in kw.items()})
    assert meta.shape == fake.shape and meta.device.type == "meta"


def test_import_diffq_does_not_import_the_triton_kernels():
    code = "import sys, diffq; sys.exit(1 if 'diffq.kernels.triton_ops' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_the_dispatch_would_import_a_compiled_copy():
    assert "diffq.kernels.triton_ops" not in sys.modules


CONV_CASES = [  # (linear case for the weights and options, input [N, C, H, W], stride)
    (CASES[0], (2, 192, 5, 4), (1, 1)),  # w4a8 group 64, dynamic, rank 16, bias, smoothing
    (CASES[6], (1, 128, 6, 7), (2, 2)),  # w8a8 static scale, rank 16, bias, bf16; strided
    (CASES[7], (2, 192, 3, 5), (1, 1)),  # w4a16 group 64, rank 16, bias, smoothing
]


@pytest.mark.parametrize("case, shape, stride", CONV_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_1x1_convolution_runs_the_linear_kernels(case, shape, stride):
    """A 1x1 convolution is the linear layer over its pixels: the Triton result is within the linear
    bound of the float64 function, as the reference convolution is, and equals the linear kernels'."""
    _, qweight, w_scale, w_zero, kw = make_inputs(case)
    x = torch.randn(*shape).to(case.dtype)
    conv_kw = dict(w_bits=kw["w_bits"], w_code_offset=kw["w_code_offset"], weight_shape=(case.n, case.k, 1, 1),
                   stride=stride, padding=(0, 0), dilation=(1, 1), groups=1, bias=kw["bias"],
                   act_bits=kw["act_bits"], act_scale=kw.get("act_scale"), act_group_size=kw["act_group_size"],
                   smooth=kw["smooth"], lowrank_down=kw.get("lowrank_down"), lowrank_up=kw.get("lowrank_up"))
    assert triton_ops.conv2d_unsupported_reason(x, qweight, w_scale, w_zero, **conv_kw) is None
    y = triton_ops.quantized_conv2d_triton(x, qweight, w_scale, w_zero, **conv_kw)
    ref = reference.quantized_conv2d(x, qweight, w_scale, w_zero, **conv_kw)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    tokens = x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1).contiguous()
    expected, tol = expected_and_tolerance(tokens, qweight, w_scale, w_zero, kw)
    for out in (y, ref):
        err = (out.permute(0, 2, 3, 1).reshape(-1, case.n).double() - expected).abs()
        assert float((err / tol).max()) <= 1.0
    linear = triton_ops.quantized_linear_triton(tokens, qweight, w_scale, w_zero, **kw)
    assert torch.equal(y, linear.permute(0, 3, 1, 2))


@pytest.mark.parametrize("case", IMPLICIT_GEMM_CASES, ids=lambda c: c.name)
def test_implicit_gemm_convolution_matches_float64_reference(case):
    """k x k, strided, dilated, padded, split and channels-last convolutions run the implicit-GEMM
    kernel, within the linear kernels' bound of the float64 function over the patches (as the
    reference convolution is), with the reference's shape and dtype."""
    x, qweight, w_scale, w_zero, kw = conv_inputs(case)
    assert triton_ops.conv2d_unsupported_reason(x, qweight, w_scale, w_zero, **kw) is None
    assert triton_ops._conv_as_linear_reason(x, kw["weight_shape"], kw["padding"], 1, kw["act_bits"],
                                             kw.get("act_scale"), kw["act_segments"]) is not None
    y = triton_ops.quantized_conv2d_triton(x, qweight, w_scale, w_zero, **kw)
    ref = reference.quantized_conv2d(x, qweight, w_scale, w_zero, **kw)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.is_contiguous()
    expected, tol = conv_expected_and_tolerance(x, qweight, w_scale, w_zero, kw)
    for result in (y, ref):
        err = (result.permute(0, 2, 3, 1).reshape(-1, case.out).double() - expected).abs()
        assert bool((err <= tol).all())  # a padded border's outputs are exact: error and bound 0


def test_implicit_gemm_quantizes_patches_as_the_reference_does():
    """With a weight of a single 1 per output channel, each output is one quantized input value:
    the kernel's activation codes equal the reference's bit for bit (ties to even, clamping)."""
    channels, out = 32, 32
    x = (torch.randint(-300, 300, (1, channels, 4, 5)) * 0.25).to(torch.float32)  # many exact .5 ties
    codes = torch.full((out, channels * 9), 128, dtype=torch.uint8)
    for o in range(out):
        codes[o, o * 9 + 4] = 129  # value 1 at the centre tap of channel o
    kw = dict(w_bits=8, w_code_offset=128, weight_shape=(out, channels, 3, 3), stride=(1, 1), padding=(1, 1),
              dilation=(1, 1), groups=1, act_bits=8, act_scale=torch.tensor([0.5]), act_segments=())
    w_scale = torch.ones(out, 1)
    y = triton_ops.quantized_conv2d_triton(x, pack(codes, 8), w_scale, None, **kw)
    assert torch.equal(y, torch.round(x / 0.5).clamp(-128, 127) * 0.5)
    assert torch.equal(y, reference.quantized_conv2d(x, pack(codes, 8), w_scale, None, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("segments, group", [((), 32), ((48,), None), ((32,), 32)])
def test_dynamic_convolution_input_is_fake_quantized_as_the_reference_does(segments, group, dtype):
    """A convolution's input with dynamic scales (per pixel, group and segment, after smoothing) is
    fake-quantized to the reference's values bit for bit, then rounded once to ``x``'s dtype."""
    x = (torch.randint(-300, 300, (2, 64, 3, 5)) * 0.25).to(dtype)  # many exact .5 ties
    x[0, :, 1, 2] = 0  # an all-zero pixel: scale 1
    smooth = (torch.rand(64) + 0.5).to(dtype)
    y = triton_ops.fake_quantize_pixels(x, 4, act_group_size=group, act_segments=segments, smooth=smooth)
    xs = x.float() / smooth.float().reshape(1, -1, 1, 1)
    expected = reference._fake_quantize_channels(xs, 4, None, segments, group).to(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, expected)


@pytest.mark.parametrize("change, reason", [
    (dict(weight_shape=(24, 32, 3, 3), act_group_size=16), "activation group 16"),
    (dict(groups=2, weight_shape=(24, 16, 1, 1)), "groups=2"),
    (dict(padding=(1, 1), act_group_size=8), "activation group 8"),
    (dict(weight_shape=(24, 32, 3, 3), act_scale=torch.tensor([0.1, 0.2]), act_segments=(12,)), "segments of"),
])
def test_other_convolutions_run_the_reference(change, reason):
    N, C, out = 1, 32, 24
    kw = dict(w_bits=8, w_code_offset=128, weight_shape=(out, C, 1, 1), stride=(1, 1), padding=(0, 0),
              dilation=(1, 1), groups=1, act_bits=8)
    kw.update(change)
    cols = kw["weight_shape"][1] * kw["weight_shape"][2] * kw["weight_shape"][3]
    qweight = pack(torch.randint(0, 256, (out, cols), dtype=torch.uint8), 8)
    w_scale = torch.rand(out, 1) + 0.5
    x = torch.randn(N, C, 6, 6)
    assert reason in (triton_ops.conv2d_unsupported_reason(x, qweight, w_scale, None, **kw) or "")
    y = triton_ops.quantized_conv2d_triton(x, qweight, w_scale, None, **kw)
    assert torch.equal(y, reference.quantized_conv2d(x, qweight, w_scale, None, **kw))


def test_cuda_convolution_kernel_hands_1x1_convolutions_to_triton(monkeypatch):
    """The op's CUDA kernel passes the op's arguments on to the Triton launcher (called here directly
    on CPU tensors, with the interpreted launcher)."""
    launched = []

    def launcher(name):
        def launch(*args, **kwargs):
            launched.append(name)
            return getattr(triton_ops, name)(*args, **kwargs)
        return launch

    monkeypatch.setattr(kernels, "_triton_launcher", launcher)
    monkeypatch.delenv("DIFFQ_KERNELS", raising=False)
    monkeypatch.delenv("DIFFQ_NO_TRITON", raising=False)
    case, shape, stride = CONV_CASES[0]
    _, qweight, w_scale, w_zero, kw = make_inputs(case)
    x = torch.randn(*shape).to(case.dtype)
    y = kernels._conv2d_cuda(x, qweight, w_scale, w_zero, kw["w_bits"], kw["w_code_offset"], [case.n, case.k, 1, 1],
                             list(stride), [0, 0], None, [1, 1], 1, kw["bias"], kw["act_bits"], None, [],
                             kw["act_group_size"], kw["smooth"], kw["lowrank_down"], kw["lowrank_up"], None)
    assert launched == ["quantized_conv2d_triton"]
    conv_kw = dict(w_bits=kw["w_bits"], w_code_offset=kw["w_code_offset"], weight_shape=(case.n, case.k, 1, 1),
                   stride=stride, padding=(0, 0), dilation=(1, 1), groups=1, bias=kw["bias"], act_bits=kw["act_bits"],
                   act_group_size=kw["act_group_size"], smooth=kw["smooth"], lowrank_down=kw["lowrank_down"],
                   lowrank_up=kw["lowrank_up"])
    assert torch.equal(y, triton_ops.quantized_conv2d_triton(x, qweight, w_scale, w_zero, **conv_kw))


@pytest.mark.parametrize("case", [c for c in IMPLICIT_GEMM_CASES if c.name in (
    "w8a8-ch-3x3-s2-split-bf16", "w4a4-g64-actg64-3x3-r16-bias-smooth")], ids=lambda c: c.name)
def test_cuda_convolution_kernel_hands_3x3_convolutions_to_the_implicit_gemm(monkeypatch, case):
    """A split 3x3 convolution with static scales, and a W4A4 one with dynamic scales, smoothing and a
    low-rank branch, go from the op's CUDA kernel to the implicit GEMM."""
    monkeypatch.delenv("DIFFQ_KERNELS", raising=False)
    monkeypatch.delenv("DIFFQ_NO_TRITON", raising=False)
    monkeypatch.setattr(kernels, "_triton_launcher", lambda name: getattr(triton_ops, name))
    launched = []
    implicit = triton_ops.implicit_gemm_conv2d
    monkeypatch.setattr(triton_ops, "implicit_gemm_conv2d", lambda *a, **k: launched.append(1) or implicit(*a, **k))
    x, qweight, w_scale, w_zero, kw = conv_inputs(case)
    y = kernels._conv2d_cuda(x, qweight, w_scale, w_zero, kw["w_bits"], kw["w_code_offset"], list(kw["weight_shape"]),
                             list(kw["stride"]), list(kw["padding"]), None, list(kw["dilation"]), 1, kw["bias"],
                             kw["act_bits"], kw.get("act_scale"), list(kw["act_segments"]), kw["act_group_size"],
                             kw["smooth"], kw.get("lowrank_down"), kw.get("lowrank_up"), None)
    assert launched == [1]
    assert torch.equal(y, implicit(x, qweight, w_scale, w_zero, **kw))


def test_autotuning_pruner_keeps_tiles_that_suit_the_call():
    """Pure-Python pruning of the autotuning candidates: K tiles inside scale groups, M tiles that
    follow the token count, 64-column tiles where 128 spill, stages within shared memory."""
    prune, blocks = triton_ops.prune_gemm_configs, triton_ops.Blocks
    configs = triton_ops.INT_CONFIGS
    common = dict(K=3072, int_path=True, w_bits=4, narrow_n=False, smem_limit=232448, capability=90)
    grouped = prune(configs, M=4096, seg=64, **common)
    assert grouped and all(b.k == 64 and b.m >= 64 for b in grouped)
    assert {b.k for b in prune(configs, M=4096, seg=3072, **common)} == {64, 128}  # one scale per row
    # groups of 96 columns need 32-column K tiles, which no candidate has: the fixed choice runs
    assert prune(configs, M=4096, seg=96, **common) == [triton_ops._gemm_blocks(4096, 3072, 96, True)]
    small = prune(configs, M=2, seg=3072, **common)
    assert small and all(b.m == 16 for b in small)
    assert all(b.m <= 128 for b in prune(configs, M=100, seg=3072, **common))
    assert all(b.n == 64 for b in prune(configs, M=4096, seg=64, **{**common, "narrow_n": True}))
    tight = prune(configs, M=4096, seg=3072, **{**common, "w_bits": 8, "smem_limit": 101376})
    assert tight and all(b.stages * triton_ops._stage_bytes(b, True, 8) + 16384 <= 101376 for b in tight)
    assert blocks(128, 128, 128, 8, 3) not in tight  # 96 KiB of stages + margin > 99 KiB
    none_fit = prune([blocks(128, 128, 128, 8, 3)], M=4096, seg=64, **common)
    assert none_fit == [triton_ops._gemm_blocks(4096, 3072, 64, True)]  # the fixed choice, alone
    wo = prune(triton_ops.WEIGHT_ONLY_CONFIGS, M=4096, seg=64, **{**common, "int_path": False})
    assert wo and all(b.k <= 64 and 64 % b.k == 0 for b in wo)


def test_autotuning_key_and_call_pruning():
    named = dict(M=4096, K=1280, W_GROUP=64, A_GROUP=1280, R=32)
    kept = triton_ops.prune_for_call(triton_ops.INT_CONFIGS, True, named, dict(W_BITS=4, HAS_ZERO=True), 232448, 90)
    assert kept and all(b.n == 64 and b.k == 64 for b in kept)  # zero points corrected per K tile
    weight_only = dict(W_BITS=4, HAS_ZERO=False)
    wide = triton_ops.prune_for_call(triton_ops.WEIGHT_ONLY_CONFIGS, False, named, weight_only, 232448, 90)
    assert {b.n for b in wide} == {64, 128}
    consumer = triton_ops.prune_for_call(triton_ops.WEIGHT_ONLY_CONFIGS, False, named, weight_only, 101376, 120)
    assert consumer and all(b.n == 64 for b in consumer)  # 128-column weight-only tiles spill on sm_120
    assert triton_ops.Blocks(128, 64, 64, 4, 4) in wide and triton_ops.Blocks(128, 64, 64, 4, 4) not in consumer
    assert [triton_ops._m_bucket(m) for m in (1, 16, 17, 77, 4096, 20000)] == [16, 16, 32, 128, 4096, 4096]


def test_convolution_autotuning_pruner_keeps_tiles_that_do_not_spill():
    """The implicit GEMM's candidates: 32-deep K tiles inside the scale groups, M tiles that follow the
    output pixels, no tile of a kind that spilled (128 x 128 on sm_90; > 16 patch elements per thread)."""
    prune, blocks, configs = triton_ops.prune_conv_configs, triton_ops.Blocks, triton_ops.CONV_CONFIGS
    common = dict(K=640 * 9, w_bits=4, smem_limit=232448)
    hopper = prune(configs, M=8192, seg=64, int_path=True, capability=90, **common)
    assert hopper and all(b.k == 32 and b.m >= 64 and b.m * b.n < 128 * 128 for b in hopper)
    ampere = prune(configs, M=8192, seg=64, int_path=True, capability=80, **common)
    assert blocks(128, 128, 32, 8, 3) in ampere and blocks(128, 128, 32, 8, 3) not in hopper
    small = prune(configs, M=128, seg=64, int_path=False, capability=90, **common)  # 2 images of 8x8
    assert small and all(b.m <= 128 for b in small) and any(b.m < 64 for b in small)
    deep = [blocks(128, 64, 64, 8, 3), blocks(128, 64, 32, 4, 3), blocks(64, 64, 64, 4, 3)]
    assert prune(deep, M=8192, seg=5760, int_path=True, capability=80, **common) == [
        triton_ops._conv_blocks(8192, 5760, 5760, True, False)]  # none kept: the fixed tile, alone
    # through the kernel's arguments: a split at column 5760 of 11,520 (per-channel weights) is the segment
    named = dict(M=8192, K=11520, W_GROUP=11520, SEG_COL=5760, R=0)
    kept = triton_ops.prune_for_call(configs, True, named, dict(W_BITS=8), 232448, 90)
    assert kept == prune(configs, M=8192, K=11520, seg=5760, int_path=True, w_bits=8, smem_limit=232448,
                         capability=90)


@pytest.mark.parametrize("case", [c for c in IMPLICIT_GEMM_CASES if c.name in (
    "w4a8-g64-3x3-r16-bias-smooth", "w4a4-g64-actg64-3x3-r16-bias-smooth")], ids=lambda c: c.name)
def test_tuned_convolution_runs_a_pruned_candidate(monkeypatch, tmp_path, case):
    """The CUDA launch path of the implicit GEMM, in the interpreter with a stand-in for
    ``triton.autotune``: the pruner gets the kernel's arguments by name, a kept candidate runs, its
    result is within the bound, and the winner is written to the cache."""
    monkeypatch.setenv("DIFFQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_ops, "_autotuning", lambda x: True)
    monkeypatch.setattr(triton_ops, "_smem_limit", lambda device: 232448)
    monkeypatch.setattr(triton_ops, "_LOADED", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    ran = []

    class Tuner:  # what triton.autotune does, with the first kept candidate as the winner
        def __init__(self, kernel):
            self.kernel, self.cache = kernel, {}

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                named = dict(zip(self.kernel.arg_names, args, strict=False))
                kept = triton_ops._early_prune(None)(
                    [triton_ops._to_config(b) for b in triton_ops.CONV_CONFIGS], named, **kwargs)
                b = triton_ops._to_blocks(kept[0])
                ran.append(b)
                self.cache[tuple(named.get(k, kwargs.get(k)) for k in triton_ops.TUNING_KEYS["conv"])] = kept[0]
                meta = dict(BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, GROUP_M=b.group_m)
                self.kernel[grid(meta)](*args, **kwargs, **meta, num_warps=b.warps, num_stages=b.stages)
            return run

    monkeypatch.setattr(triton_ops, "_tuner", lambda kind, kernel: Tuner(kernel))
    x, qweight, w_scale, w_zero, kw = conv_inputs(case)
    y = triton_ops.implicit_gemm_conv2d(x, qweight, w_scale, w_zero, **kw)
    assert len(ran) == 1 and ran[0] in triton_ops.CONV_CONFIGS  # not the interpreter's fixed tile
    expected, tol = conv_expected_and_tolerance(x, qweight, w_scale, w_zero, kw)
    err = (y.permute(0, 2, 3, 1).reshape(-1, case.out).double() - expected).abs()
    assert bool((err <= tol).all())
    assert "conv" in json.loads((tmp_path / "autotune.json").read_text())["NVIDIA H200"]


def test_autotuning_keys_name_the_kernels_arguments():
    """``triton.autotune`` silently drops a key its kernel does not have: every name is an argument."""
    kernels_by_kind = {"int": triton_ops._int_gemm_kernel, "weight_only": triton_ops._weight_only_kernel,
                       "conv": triton_ops._conv_kernel}
    assert set(triton_ops.TUNING_KEYS) == set(kernels_by_kind)
    for kind, kernel in kernels_by_kind.items():
        assert set(triton_ops.TUNING_KEYS[kind]) <= set(kernel.arg_names), kind


def test_the_interpreter_never_autotunes(monkeypatch):
    """Under the interpreter every GEMM runs the fixed ``_gemm_blocks`` tiles: no autotuner is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("autotuner used in the interpreter")

    monkeypatch.setattr(triton_ops, "_tuner", refuse)
    x, qweight, w_scale, w_zero, kw = make_inputs(CASES[0])
    assert not triton_ops._autotuning(x)
    triton_ops.quantized_linear_triton(x, qweight, w_scale, w_zero, **kw)
    x, qweight, w_scale, w_zero, kw = make_inputs(CASES[7])
    triton_ops.quantized_linear_triton(x, qweight, w_scale, w_zero, **kw)
    for case in IMPLICIT_GEMM_CASES[:1] + IMPLICIT_GEMM_CASES[4:5]:  # int8 and weight-only convolutions
        x, qweight, w_scale, w_zero, kw = conv_inputs(case)
        triton_ops.implicit_gemm_conv2d(x, qweight, w_scale, w_zero, **kw)
    assert triton_ops._TUNERS == {}
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="never autotunes"):
        triton_ops._tuner("int", None)


def test_autotuning_winners_round_trip_through_the_json_cache(monkeypatch, tmp_path):
    """Winners are kept per GPU name in ``$DIFFQ_CACHE_DIR/autotune.json`` and read back into a tuner."""
    class Tuner:
        def __init__(self):
            self.cache = {}

    monkeypatch.setenv("DIFFQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(triton_ops, "_LOADED", set())
    first = Tuner()
    key = (128, 3072, 3072, 64, 0, 64, "torch.int8", "torch.float32")
    first.cache[key] = triton_ops._to_config(triton_ops.Blocks(128, 64, 64, 8, 4))
    triton_ops._save_winners("int", first, "NVIDIA H200")
    second = Tuner()
    assert triton_ops._load_winners("int", second, torch.device("cpu")) == "NVIDIA H200"
    assert triton_ops._to_blocks(second.cache[key]) == triton_ops.Blocks(128, 64, 64, 8, 4)
    other = Tuner()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    triton_ops._load_winners("int", other, torch.device("cpu"))
    assert other.cache == {}  # another GPU's winners are not used
