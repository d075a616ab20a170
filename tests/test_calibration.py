"""Timestep-aware calibration: statistics, files, timestep groups, BOS, smoothing, clipping."""

import numpy as np
import pytest
import torch
from allocations import ReturnedTensors
from torch import nn

import diffq
from diffq.calibration import ActivationObserver, CalibrationStats, histogram_edges, timestep_groups
from diffq.context import set_cfg_split, timestep
from diffq.errors import QuantizationInputError
from diffq.formats import IntFormat, fake_quantize
from diffq.modules import QuantizedConv2d, QuantizedLinear
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import (
    TINY_PROMPTS,
    run_tiny,
    tiny_call_kwargs,
    tiny_pixart_pipeline,
    tiny_sd_pipeline,
)
from diffq.plan import LayerConfig
from diffq.ranges import search_weight_clip
from diffq.smoothing import layer_error, search_alpha, smoothing_vector


def observe(layers, batches_by_t, **kwargs):
    observer = ActivationObserver(layers, **kwargs)
    with observer.observe() as stats:
        for t, batches in batches_by_t.items():
            with timestep(t):
                for x in batches:
                    for module in layers.values():
                        module(x)
    return stats


def test_stats_equal_direct_computation():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    inputs = {0.0: [torch.randn(5, 16), torch.randn(3, 7, 16)], 500.0: [torch.randn(4, 16) * 3]}
    stats = observe({"lin": layer}, inputs)
    assert stats.timesteps("lin") == [500.0, 0.0]
    for t, batches in inputs.items():
        rows = torch.cat([x.reshape(-1, 16) for x in batches])
        step = stats.layers["lin"][(t, "cond")]
        assert torch.equal(step.channel_min, rows.amin(0))
        assert torch.equal(step.channel_max, rows.amax(0))
        assert int(step.histogram.sum()) == rows.numel()
    everything = torch.cat([x.reshape(-1, 16) for b in inputs.values() for x in b])
    assert stats.absmax("lin") == pytest.approx(float(everything.abs().max()))
    # The percentile read from the log2 histogram is within one bin (2^(1/8)) above the exact one.
    exact = float(torch.quantile(everything.abs().flatten(), 0.9))
    assert exact <= stats.percentile("lin", 90) <= exact * 2 ** (1 / 8) * 1.0001
    assert stats.drift("lin") == pytest.approx(
        float(inputs[500.0][0].abs().max()) / float(torch.cat([x.reshape(-1, 16) for x in inputs[0.0]]).abs().max())
    )
    assert not layer._forward_pre_hooks  # hooks removed


def test_conv_channels_and_cfg_halves_are_kept_apart():
    conv = nn.Conv2d(3, 4, 1)
    x = torch.randn(4, 3, 5, 5)
    x[:2] *= 10  # the unconditional half has a much wider range
    observer = ActivationObserver({"conv": conv})
    set_cfg_split(True)
    try:
        with observer.observe() as stats, timestep(7.0):
            conv(x)
    finally:
        set_cfg_split(False)
    uncond = stats.layers["conv"][(7.0, "uncond")]
    cond = stats.layers["conv"][(7.0, "cond")]
    assert torch.equal(uncond.channel_max, x[:2].amax(dim=(0, 2, 3)))
    assert torch.equal(cond.channel_max, x[2:].amax(dim=(0, 2, 3)))
    assert stats.absmax("conv", branch="cond") < stats.absmax("conv", branch="uncond")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_reduce_a_wide_input_in_chunks_to_the_same_figures(monkeypatch, dtype):
    """Statistics and the reservoir of an input reduced a few rows at a time (``REDUCE_ELEMENTS``)
    equal those of reducing it whole in float32, for linear and 3x3-conv inputs and both halves of a
    guided batch; and no float32 copy of the whole input is made (the histogram's temporaries at the
    input's size were 1.7 GB at a Flux single block's ``proj_out``)."""
    import diffq.calibration as calibration

    torch.manual_seed(0)
    cases = {"lin": (nn.Linear(96, 4), torch.randn(4, 50, 96).to(dtype) * 3),
             "conv": (nn.Conv2d(24, 4, 3, padding=1), torch.randn(4, 24, 9, 9).to(dtype))}
    monkeypatch.setattr(calibration, "REDUCE_ELEMENTS", 1000)  # 10 rows of 96 channels, 41 of 24
    for name, (layer, x) in cases.items():
        layer.to(dtype)
        observer = ActivationObserver({name: layer}, sample_rows=64, seed=2)
        set_cfg_split(True)
        try:
            with observer.observe() as stats, timestep(3.0), ReturnedTensors() as seen, torch.no_grad():
                layer(x)
        finally:
            set_cfg_split(False)
        rows = x.movedim(1 if name == "conv" else -1, -1).reshape(-1, x.shape[1 if name == "conv" else -1]).float()
        whole = ActivationObserver({name: layer}, sample_rows=64, seed=2)
        whole._add_sample(name, rows, 3.0)
        assert torch.equal(stats.samples[name].rows, whole.stats.samples[name].rows)
        for branch, part in (("uncond", rows[: len(rows) // 2]), ("cond", rows[len(rows) // 2 :])):
            step = stats.layers[name][(3.0, branch)]
            assert torch.equal(step.channel_min, part.amin(0)) and torch.equal(step.channel_max, part.amax(0))
            assert torch.equal(step.histogram, calibration.abs_histogram(part))
        # A linear layer's rows are a view of its input; a conv's are one channels-last copy in its own dtype.
        limit = x.numel() * x.element_size() if name == "conv" else rows.numel() * 4 // 2
        assert seen.largest_allocation() <= limit, (name, seen.largest_allocation())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["a token", "the first token of a BOS layer"])
def test_a_non_finite_input_is_a_clear_error(bad, where):
    layer = nn.Linear(8, 2)
    x = torch.randn(2, 5, 8)
    x[1, 0 if where.startswith("the first") else 3, 4] = bad
    observer = ActivationObserver({"k": layer}, bos_layers={"k"} if where.startswith("the first") else set())
    with observer.observe(), timestep(1.0), pytest.raises(QuantizationInputError, match="'k' received NaN or inf"):
        layer(x)


def test_reservoir_sample_is_bounded_and_deterministic():
    layer = nn.Linear(8, 2)
    inputs = {float(t): [torch.randn(50, 8)] for t in range(10)}
    a = observe({"lin": layer}, inputs, sample_rows=64, seed=3)
    b = observe({"lin": layer}, inputs, sample_rows=64, seed=3)
    assert a.samples["lin"].rows.shape == (64, 8) and a.samples["lin"].seen == 500
    assert torch.equal(a.samples["lin"].rows, b.samples["lin"].rows)
    assert len(set(a.samples["lin"].timesteps.tolist())) > 5  # rows from many steps, not just the first


def test_reservoir_keeps_the_later_row_when_two_draw_one_slot():
    """The vectorised reservoir equals row-by-row reservoir sampling, also where many rows of one
    batch draw the same slot and indexed writes run on several threads."""
    layer = nn.Identity()
    x = torch.randn(20_000, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = observe({"id": layer}, {5.0: [x]}, sample_rows=32, seed=1)
    finally:
        torch.set_num_threads(threads)
    draws = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = x[:32].half().clone()
    for i in range(32, x.shape[0]):
        slot = int(draws[i] * (i + 1))
        if slot < 32:
            expected[slot] = x[i].half()
    assert torch.equal(stats.samples["id"].rows, expected)


def test_save_load_merge_round_trip(tmp_path):
    layer = nn.Linear(8, 2)
    a = observe({"lin": layer}, {1.0: [torch.randn(4, 8)], 2.0: [torch.randn(4, 8)]}, sample_rows=6)
    b = observe({"lin": layer}, {2.0: [torch.randn(4, 8) * 5]}, sample_rows=6)
    a.bos["lin"] = torch.ones(8)
    a.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStats.load(tmp_path / "stats.safetensors")
    for key, step in a.layers["lin"].items():
        assert torch.equal(loaded.layers["lin"][key].channel_max, step.channel_max)
        assert torch.equal(loaded.layers["lin"][key].histogram, step.histogram)
    assert torch.equal(loaded.samples["lin"].rows, a.samples["lin"].rows)
    assert torch.equal(loaded.bos["lin"], a.bos["lin"])
    merged = loaded.merge(b)
    assert merged.absmax("lin", [2.0]) == pytest.approx(max(a.absmax("lin", [2.0]), b.absmax("lin")))
    assert merged.layers["lin"][(2.0, "cond")].count == 2
    assert merged.samples["lin"].rows.shape[0] == 6 + 4  # a kept 6 of its 8 rows, b all of its 4
    assert "lin" not in merged.bos  # b saw the layer without a constant BOS
    assert a.layers["lin"][(2.0, "cond")].count == 1  # inputs untouched
    with pytest.raises(diffq.CheckpointError):
        CalibrationStats.load(tmp_path / "missing.safetensors")


def test_histogram_edges_cover_fp16_range():
    edges = histogram_edges()
    assert edges[0] < 1e-6 and edges[-1] > 65504


def test_timestep_groups_split_by_value():
    steps = [999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0]
    bounds = timestep_groups(steps, 4)
    assert bounds == [449.0, 649.0, 849.0]  # pairs of steps: {299, 399}, {499, 599}, ...
    assert timestep_groups(steps, 1) == [] and len(timestep_groups(steps[:2], 4)) == 1


def test_layer_looks_up_its_scale_by_timestep_value():
    linear = nn.Linear(16, 4, bias=False)
    config = LayerConfig(8, None, True, 8, "static", a_groups=2)
    q = QuantizedLinear.from_float(linear, config)
    q.set_activation_scale(torch.tensor([[1.0], [8.0]]), bounds=[500.0])
    x = torch.full((1, 16), 3.0)
    weight = q.dequantize_weight()
    with timestep(100.0):  # group 0: range [-1, 1], so 3.0 saturates
        assert torch.allclose(q(x), torch.ones(1, 16) @ weight.t(), atol=1e-5)
    with timestep(731.5):  # a value never calibrated still finds its group: range [-8, 8]
        expected = torch.full((1, 16), round(3.0 / (8 / 127)) * (8 / 127)) @ weight.t()
        assert torch.allclose(q(x), expected, atol=1e-5)
    assert torch.allclose(q(x), expected, atol=1e-5)  # outside a denoiser call: the widest range


def test_bos_token_key_value_equal_full_precision():
    torch.manual_seed(0)
    to_k = nn.Linear(64, 32)
    bos = torch.randn(64) * 30  # CLIP's BOS state is a large outlier
    def states(n):
        x = torch.randn(n, 6, 64)
        x[:, 0] = bos
        return x
    observer = ActivationObserver({"attn2.to_k": to_k}, bos_layers={"attn2.to_k"})
    with observer.observe() as stats:
        to_k(states(2))
        to_k(states(3))
    assert torch.equal(stats.bos["attn2.to_k"], bos)
    assert stats.absmax("attn2.to_k") < 10  # the BOS outlier stays out of the activation range
    config = LayerConfig(4, 64, True, 8, "static", bos=True)
    q = QuantizedLinear.from_float(to_k, config, bos_input=stats.bos["attn2.to_k"])
    q.set_activation_scale(stats.absmax("attn2.to_k"))
    x = states(4)
    with torch.no_grad():
        out, ref = q(x), to_k(x)
    # Full precision: equal up to the float32 summation order of a batched matmul (~1e-7 relative).
    assert torch.allclose(out[:, 0], ref[:, 0], rtol=1e-6, atol=1e-5)
    assert not torch.allclose(out[:, 1:], ref[:, 1:], atol=1e-4)  # the rest is quantized
    other = torch.randn(1, 6, 64)  # a different first token is not replaced
    assert not torch.allclose(q(other)[:, 0], q.bos_output)


def test_bos_handling_on_sd_pipeline_but_not_t5():
    sd = tiny_sd_pipeline()
    stats = diffq.calibrate(sd, TINY_PROMPTS[:2], num_inference_steps=2, progress=False, **tiny_call_kwargs(sd))
    bos_layers = {n for n in stats.bos}
    assert bos_layers and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in bos_layers)
    assert any(b == "uncond" for layer in stats.layers.values() for (_t, b) in layer)  # CFG halves recorded
    pixart = tiny_pixart_pipeline()
    stats = diffq.calibrate(pixart, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **tiny_call_kwargs(pixart))
    assert not stats.bos


def test_calibration_hands_freed_memory_back_after_every_denoiser_call(monkeypatch):
    """Without a trim per call glibc kept what the observers' reductions freed: an SD 1.5-size UNet's
    default calibration grew the heap by about the float weights again (benchmarks/RESULTS.md)."""
    from diffq import calibration

    pipe = tiny_sd_pipeline()
    events = []
    monkeypatch.setattr(calibration, "return_freed_memory", lambda: events.append("trim"))
    hook = pipe.unet.register_forward_hook(lambda *_: events.append("call"))
    try:
        diffq.calibrate(pipe, TINY_PROMPTS[:2], num_inference_steps=3, progress=False, **tiny_call_kwargs(pipe))
    finally:
        hook.remove()
    assert events == ["call", "trim"] * 6


def test_calibrating_a_bare_module_hands_freed_memory_back_after_every_call(monkeypatch):
    from diffq import calibration

    events = []
    monkeypatch.setattr(calibration, "return_freed_memory", lambda: events.append("trim"))
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model.register_forward_hook(lambda *_: events.append("call"))
    inputs = [{"input": torch.randn(2, 16)} for _ in range(3)]
    diffq.quantize(model, "w8a8", calibration=inputs, progress=False)
    assert events[: 2 * len(inputs)] == ["call", "trim"] * len(inputs)


def test_split_concatenation_gets_one_scale_per_part():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight[:, :32] = 0  # the output depends only on the small second part
    x = torch.cat([torch.randn(2, 32, 6, 6) * 20, torch.randn(2, 32, 6, 6) * 0.1], dim=1)
    errors = {}
    for split in (None, 32):
        config = LayerConfig(8, None, True, 8, "static", a_split=split)
        q = QuantizedConv2d.from_float(conv, config)
        if split:
            q.set_activation_scale(torch.tensor([[float(x[:, :32].abs().max()), float(x[:, 32:].abs().max())]]))
        else:
            q.set_activation_scale(float(x.abs().max()))
        with torch.no_grad():
            errors[split] = float((q(x) - conv(x)).pow(2).mean())
    # One scale for both parts rounds the small part to a few levels; its own scale keeps it.
    assert errors[32] < errors[None] / 100


def test_smoothing_search_finds_and_reduces_outlier_error():
    torch.manual_seed(0)
    weight = torch.randn(32, 64) * 0.05
    rows = torch.randn(256, 64)
    rows[:, 3] *= 60  # one outlier channel, as in real transformer activations
    absmax = rows.abs().amax(0)
    fmt = IntFormat(8, True, "channel")
    alpha = search_alpha(rows, weight, fmt, 8, absmax)
    assert alpha is not None
    smoothed = layer_error(rows, weight, fmt, 8, absmax, smoothing_vector(absmax, weight, alpha), False)
    assert smoothed < layer_error(rows, weight, fmt, 8, absmax, None, False) / 2


def test_smoothing_search_rejects_a_weight_with_nan():
    weight = torch.randn(8, 64)
    weight[2, 5] = float("nan")
    rows = torch.randn(32, 64)
    with pytest.raises(QuantizationInputError, match="weight to quantize contains NaN"):
        search_alpha(rows, weight, IntFormat(4, True, "group", 64), 8, rows.abs().amax(0))


def test_mse_weight_clip_beats_min_max():
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    weight[:, 0] = 12  # a heavy tail
    fmt = IntFormat(4, True, "group", 64)
    ratios = search_weight_clip(weight, fmt)
    assert ratios.shape == (16, 2) and (ratios < 1).any()
    from diffq.formats import compute_scales, quantize

    scale, zero = compute_scales(weight, fmt, ratios)
    searched = (quantize(weight, fmt, scale, zero).dequantize() - weight).pow(2).sum()
    assert searched < (fake_quantize(weight, fmt) - weight).pow(2).sum()


def test_timestep_is_published_during_the_denoiser_call_only():
    from diffq.context import current_timestep

    pipe = tiny_sd_pipeline()
    seen = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda _m, _a: seen.append(current_timestep()))
    diffq.quantize(pipe, "w8a16-rtn", progress=False)  # installs the timestep hook
    run_tiny(pipe, steps=3)
    assert len(seen) == 3 and all(t is not None for t in seen) and seen == sorted(seen, reverse=True)
    assert current_timestep() is None


def test_calibrate_with_8_steps_generate_with_20():
    pipe = tiny_sd_pipeline()
    kwargs = tiny_call_kwargs(pipe)
    reference = run_tiny(pipe, steps=20)
    diffq.quantize(pipe, "w8a8", calibration=TINY_PROMPTS[:2], num_calibration_steps=8, progress=False, **kwargs)
    plan = plan_of(pipe.unet)
    assert any(c.a_groups > 1 for c in plan.layers.values()), "a drifting layer got timestep groups"
    images = run_tiny(pipe, steps=20)
    assert np.isfinite(images).all()
    assert 10 * np.log10(1 / np.mean((images - reference) ** 2)) > 25


def test_calibrated_plan_records_its_choices():
    pipe = tiny_sd_pipeline()
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:2], num_inference_steps=4, progress=False, **tiny_call_kwargs(pipe))
    plan = diffq.allocate(pipe, stats, preset="w4a8", progress=False)
    assert plan.layers["up_blocks.1.resnets.0.conv1"].a_split == 128
    assert plan.layers["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].bos
    assert all(c.w_clip == "mse" for c in plan.layers.values())
    rtn = diffq.allocate(pipe, stats, preset="w4a8-rtn")
    assert all(c.a_groups == 1 and c.smooth_alpha is None and not c.bos for c in rtn.layers.values())
    with pytest.raises(diffq.DiffQError, match="w4a8-rtn"):
        diffq.allocate(pipe, None, preset="w4a8")


def test_progress_bar_redraw_does_not_replace_the_denoiser_output(monkeypatch):
    """tqdm's ``update`` returns True when it redraws; the step counter must not pass that on."""
    from diffq.pipelines import calibrate as module

    class RedrawingBar:
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, n=1):
            self.n += n
            return True

        def close(self):
            pass

    monkeypatch.setattr(module, "tqdm", RedrawingBar)
    pipe = tiny_sd_pipeline()
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=True, **tiny_call_kwargs(pipe))
    assert stats.layers
