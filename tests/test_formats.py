import pytest
import torch

from diffq.errors import DiffQError, QuantizationInputError
from diffq.formats import (
    IntFormat,
    compute_scales,
    dequantize_fp8,
    fake_quantize,
    fp8_available,
    largest_group_size,
    pack,
    packed_cols,
    quantize,
    quantize_fp8,
    unpack,
)

FORMATS = [
    IntFormat(bits, symmetric, granularity, 16 if granularity == "group" else None)
    for bits in (2, 3, 4, 8)
    for symmetric in (True, False)
    for granularity in ("tensor", "channel", "group")
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.bits}b-{'sym' if f.symmetric else 'asym'}-{f.granularity}")
def test_round_trip_error_is_at_most_half_a_step(fmt):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    q = quantize(x, fmt)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) < 2**fmt.bits
    restored = q.dequantize()
    step = q.scale.repeat_interleave(64 // q.scale.shape[-1], dim=-1).expand_as(x)
    assert ((restored - x).abs() <= step / 2 + 1e-5).all()


def test_more_bits_means_less_error():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    errors = [(fake_quantize(x, IntFormat(b, True, "group", 64)) - x).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_all_zero_rows_quantize_to_exact_zero():
    x = torch.zeros(3, 64)
    x[1] = torch.linspace(-1, 1, 64)
    for fmt in (IntFormat(4, True, "channel"), IntFormat(4, False, "group", 32), IntFormat(8, True, "tensor")):
        restored = quantize(x, fmt).dequantize()
        assert torch.isfinite(restored).all()
        assert torch.equal(restored[0], torch.zeros(64))
        assert torch.equal(restored[2], torch.zeros(64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_clear_error(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(QuantizationInputError, match="NaN|infinity"):
        quantize(x, IntFormat(4, True, "group", 64))


def test_group_size_that_does_not_divide_names_one_that_does():
    with pytest.raises(DiffQError, match=r"group size 64 does not divide the row length 96.*\b32\b"):
        quantize(torch.randn(2, 96), IntFormat(4, True, "group", 64))
    assert largest_group_size(96, 64) == 32
    assert largest_group_size(288, 64) == 32
    assert largest_group_size(36, 64) is None  # falls below the minimum of 8 -> per channel


def test_unsupported_bits_and_group_settings_raise():
    with pytest.raises(QuantizationInputError):
        IntFormat(5)
    with pytest.raises(QuantizationInputError):
        IntFormat(4, True, "group", None)


def test_symmetric_zero_is_exact_and_asymmetric_covers_a_shifted_range():
    x = torch.tensor([[0.0, 0.5, 1.0, 2.0]])
    asym = quantize(x, IntFormat(8, False, "channel"))
    assert asym.zero is not None and float(asym.zero) == 0.0
    assert torch.allclose(asym.dequantize(), x, atol=2 / 255)
    sym = quantize(torch.tensor([[-1.0, 0.0, 1.0]]), IntFormat(4, True, "channel"))
    assert float(sym.dequantize()[0, 1]) == 0.0


def test_clip_ratio_shrinks_scales():
    x = torch.randn(4, 64)
    full, _ = compute_scales(x, IntFormat(8, True, "channel"))
    clipped, _ = compute_scales(x, IntFormat(8, True, "channel"), clip_ratio=0.5)
    assert torch.allclose(clipped, full * 0.5)


@pytest.mark.parametrize(
    "fmt",
    [IntFormat(4, True, "group", 64), IntFormat(4, False, "group", 64), IntFormat(3, True, "group", 32),
     IntFormat(8, True, "channel"), IntFormat(8, False, "tensor")],
    ids=["int4-sym-g64", "int4-asym-g64", "int3-g32", "int8-channel", "int8-asym-tensor"],
)
def test_fake_quantize_equals_quantize_then_dequantize(fmt):
    """The code-free path used by the range and smoothing searches gives exactly the stored values."""
    torch.manual_seed(0)
    x = torch.randn(6, 128) * 3
    x[1] = 0  # an all-zero row: scale 1, codes 0
    x[2] = x[2].abs() + 1  # all positive: the asymmetric range is widened to include zero
    for ratio in (1.0, 0.8):
        scale, zero = compute_scales(x, fmt, ratio)
        assert torch.equal(fake_quantize(x, fmt, ratio), quantize(x, fmt, scale, zero).dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 64, 129])
def test_pack_unpack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_cols(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_four_bit_layout_low_nibble_first():
    codes = torch.tensor([[0x1, 0xA, 0xF, 0x3]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0xA1, 0x3F]]
    two_bit = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(two_bit, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(QuantizationInputError):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)


@pytest.mark.skipif(not fp8_available(), reason="torch build without float8_e4m3fn")
def test_fp8_round_trip():
    x = torch.randn(8, 64)
    values, scale = quantize_fp8(x)
    assert values.dtype == torch.float8_e4m3fn
    restored = dequantize_fp8(values, scale)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 per element.
    assert ((restored - x).abs() <= x.abs() * 2**-4 + 1e-6).all()
    with pytest.raises(QuantizationInputError):
        quantize_fp8(torch.tensor([[float("nan")]]))
