"""Sensitivity analysis: scores, resuming, the 2-process split, and mixed-precision presets."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffq
from diffq.allocation import LayerShape
from diffq.convert import convert_model
from diffq.layers import resolve_config
from diffq.pipelines import adapter_for, denoiser_of
from diffq.pipelines import sensitivity as runner
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import (
    TINY_PROMPTS,
    run_tiny,
    tiny_call_kwargs,
    tiny_pixart_pipeline,
    tiny_sd_pipeline,
)
from diffq.planning import CalibrationOptions, plan_layer
from diffq.sensitivity import Candidate, Sensitivity, candidate_config, weight_bits_cost

CANDIDATES = [Candidate(2, 8), Candidate(8, 8)]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def measure(pipe, cache=None, candidates=CANDIDATES):
    kwargs = tiny_call_kwargs(pipe)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **kwargs)
    return diffq.sensitivity(pipe, stats, candidates, TINY_PROMPTS[:1], num_inference_steps=2, cache=cache,
                             progress=False, **kwargs)


def test_scores_follow_bits_and_metric_groups():
    pipe = tiny_pixart_pipeline()
    sens = measure(pipe)
    adapter = adapter_for(pipe.transformer)
    assert set(sens.groups) == set(sens.scores)
    for name, scores in sens.scores.items():
        assert sens.groups[name] == adapter.group_of(name)
        if sens.groups[name] == "quality":  # SQNR in dB: more bits, less noise
            assert scores["w8a8"] > scores["w2a8"]
        else:  # SSIM in [-1, 1]
            assert -1 <= scores["w2a8"] <= scores["w8a8"] + 1e-6 <= 1 + 1e-6
    assert {"content", "quality"} == set(sens.groups.values())


def test_image_metric_scores_every_layer_by_final_image_psnr(tmp_path):
    pipe = tiny_pixart_pipeline()
    kwargs = tiny_call_kwargs(pipe)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **kwargs)
    layers = dict(list(adapter_for(pipe.transformer).layers(pipe.transformer)[0].items())[:2])
    sens = runner.measure_sensitivity(pipe, layers, CANDIDATES, stats, TINY_PROMPTS[:1], 2, metric="image",
                                      cache=tmp_path / "s.json", progress=False, **kwargs)
    assert sens.metric == "image" and Sensitivity.load(tmp_path / "s.json").metric == "image"
    reference = runner.final_images(pipe, TINY_PROMPTS[:1], 2, 0, kwargs)
    name = next(iter(layers))
    base = resolve_config(layers[name], candidate_config(Candidate(2, 8)))
    config = plan_layer(name, layers[name], base, CalibrationOptions(), stats)
    convert_model(pipe.transformer, diffq.QuantPlan("probe", {name: config}), stats, progress=False)
    error = float((runner.final_images(pipe, TINY_PROMPTS[:1], 2, 0, kwargs) - reference).pow(2).mean())
    assert sens.scores[name]["w2a8"] == pytest.approx(-10 * math.log10(error), abs=1e-6)
    assert sens.loss(name, "w2a8") == pytest.approx(error, rel=1e-6)  # a squared error, whatever the group
    decoupled = runner.fingerprint(pipe, list(layers), CANDIDATES, TINY_PROMPTS[:1], 2, 0, kwargs)
    assert sens.fingerprint != decoupled  # the two metrics never share a cache entry
    with pytest.raises(diffq.DiffQError, match="unknown sensitivity metric"):
        runner.measure_sensitivity(pipe, layers, CANDIDATES, stats, TINY_PROMPTS[:1], 2, metric="lpips", **kwargs)


def test_quantize_measures_with_the_metric_it_is_given(monkeypatch):
    import diffq.api

    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop once the analysis would start

    monkeypatch.setattr(diffq.api, "_measure_sensitivity", capture)
    pipe = tiny_pixart_pipeline()
    with pytest.raises(KeyboardInterrupt):
        diffq.quantize(pipe, "w3.5a8", calibration=TINY_PROMPTS[:1], num_calibration_steps=2,
                       sensitivity_metric="image", progress=False, **tiny_call_kwargs(pipe))
    assert seen["metric"] == "image"
    with pytest.raises(diffq.DiffQError, match="unknown sensitivity metric"):
        diffq.quantize(tiny_pixart_pipeline(), "w3.5a8", sensitivity_metric="ssim")


def test_interrupted_analysis_resumes(tmp_path, monkeypatch):
    cache = tmp_path / "sens.json"
    full = measure(tiny_pixart_pipeline(), cache)
    data = json.loads(cache.read_text())
    dropped = sorted(data["scores"])[:3]
    for name in dropped:
        del data["scores"][name]
    cache.write_text(json.dumps(data))  # as if the run stopped after the other layers

    probes = []
    real_sqnr, real_ssim = runner._Reference.sqnr, runner._Reference.ssim
    monkeypatch.setattr(runner._Reference, "sqnr", lambda self, d: probes.append(1) or real_sqnr(self, d))
    monkeypatch.setattr(runner._Reference, "ssim", lambda self: probes.append(1) or real_ssim(self))
    resumed = measure(tiny_pixart_pipeline(), cache)
    assert len(probes) == len(dropped) * len(CANDIDATES)
    assert resumed.scores == full.scores
    assert Sensitivity.load(cache).scores == full.scores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_matches_one_process(sd_folder, tmp_path):
    flags = ["--candidates", "w2a8,w8a8", "--steps", "2", "--height", "32", "--width", "32", "--no-progress"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TINY_PROMPTS[0] + "\n")
    flags += ["--prompts", str(prompts)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "diffq.cli", "sensitivity", str(sd_folder),
                          "--out", str(tmp_path / "one.json"), *flags], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(_free_port()), "-m", "diffq.cli", "sensitivity",
                          str(sd_folder), "--out", str(tmp_path / "two.json"), *flags],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = Sensitivity.load(tmp_path / "one.json"), Sensitivity.load(tmp_path / "two.json")
    assert a.fingerprint == b.fingerprint and a.groups == b.groups
    assert a.scores == b.scores  # the same numbers, every layer measured by one of the two processes
    assert (tmp_path / "two.json.part0-of-2").exists() and (tmp_path / "two.json.part1-of-2").exists()


def test_mixed_preset_stays_within_budget_and_beats_uniform_at_equal_bits(tmp_path):
    pipe = tiny_pixart_pipeline()
    kwargs = tiny_call_kwargs(pipe)
    reference = run_tiny(pipe, steps=2)
    diffq.quantize(pipe, "w3.5a8", calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                   sensitivity=None, **kwargs)
    plan = plan_of(pipe.transformer)
    assert plan.preset == "w3.5a8"
    layers = dict(pipe.transformer.named_modules())
    bits = sum(weight_bits_cost(Candidate(c.w_bits, c.a_bits, c.rank),
                                layers[n].in_features, layers[n].out_features) for n, c in plan.layers.items())
    params = sum(layers[n].in_features * layers[n].out_features for n in plan.layers)
    assert bits / params <= 3.5 + 1e-9
    assert {c.a_bits for c in plan.layers.values()} == {8} and plan.note.startswith("mixed plan kept")
    assert_installed_like_a_fresh_conversion(pipe, TINY_PROMPTS[:2], 2, False, **kwargs)
    mixed = 10 * np.log10(1 / np.mean((run_tiny(pipe, steps=2) - reference) ** 2))

    uniform = tiny_pixart_pipeline()  # rounded as mixed precision's candidates are: to nearest (GPTQ is w4a8's default)
    diffq.quantize(uniform, "w4a8", calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                   weight_rounding="nearest", **kwargs)
    assert mixed > 10 * np.log10(1 / np.mean((run_tiny(uniform, steps=2) - reference) ** 2))


def test_mixed_needs_a_budget_and_rejects_overrides():
    pipe = tiny_pixart_pipeline()
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **tiny_call_kwargs(pipe))
    with pytest.raises(diffq.DiffQError, match="sensitivity"):
        diffq.allocate(pipe, stats, preset="mixed")
    with pytest.raises(diffq.DiffQError, match="uniform"):
        diffq.allocate(pipe, stats, preset="w4a8", budget=3.0)


def test_allocate_cli_uses_the_measured_candidates(sd_folder, tmp_path, capsys):
    from diffq.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    sens_path = tmp_path / "s.json"
    common = ["--steps", "2", "--height", "32", "--width", "32", "--prompts", str(prompts), "--no-progress"]
    assert main(["sensitivity", str(sd_folder), "--out", str(sens_path), "--candidates", "w2a8,w8a8", *common]) == 0
    code = main(["allocate", str(sd_folder), "--budget", "5", "--sensitivity", str(sens_path),
                 "--plot", str(tmp_path / "plot"), "--out", str(tmp_path / "plan.json"), *common])
    assert code == 0
    plan = diffq.QuantPlan.from_json((tmp_path / "plan.json").read_text())
    assert {c.w_bits for c in plan.layers.values()} <= {2, 8}  # only what was measured
    assert "dB for the mixed plan" in plan.note  # checked end to end against uniform w2a8
    assert "conv_in" in capsys.readouterr().out  # the table lists kept layers too
    assert main(["allocate", str(sd_folder), "--budget", "5", "--sensitivity", str(sens_path), "--no-check",
                 "--temporal-bits", "8", "--out", str(tmp_path / "unchecked.json"), *common]) == 0
    unchecked = diffq.QuantPlan.from_json((tmp_path / "unchecked.json").read_text())
    temporal = {n: c for n, c in unchecked.layers.items() if n.endswith("time_emb_proj")}
    assert temporal and all(c.w_bits == 8 and c.a_bits is None for c in temporal.values())  # weight-only
    mixed = [c for n, c in unchecked.layers.items() if n not in temporal]
    assert {c.w_bits for c in mixed} == {2, 8} and unchecked.note == ""
    assert (tmp_path / "plot" / "bits_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["allocate", str(sd_folder), "--budget", "1", "--sensitivity", str(sens_path), *common]) == 1
    assert "smallest feasible budget" in capsys.readouterr().err
    assert main(["allocate", str(sd_folder), "--preset", "w4a8", *common]) == 1
    assert "is uniform" in capsys.readouterr().err


def test_allocate_cli_measures_only_the_presets_candidates(sd_folder, tmp_path, monkeypatch):
    from diffq.cli import main

    monkeypatch.setenv("DIFFQ_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["allocate", str(sd_folder), "--preset", "w3.5a8", "--no-check", "--steps", "2", "--height", "32",
                 "--width", "32", "--prompts", str(prompts), "--no-progress"]) == 0
    [cached] = (tmp_path / "cache" / "sensitivity").glob("*.json")
    labels = {label for scores in Sensitivity.load(cached).scores.values() for label in scores}
    assert labels and labels <= {c.label for c in diffq.get_preset("w3.5a8").candidates}  # no 4-bit activations


def test_only_grouped_convolutions_disallow_low_rank():
    from diffq.planning import layer_shape

    shape = LayerShape(288, 32, branch=False)
    assert not shape.allows(Candidate(4, 8, 32)) and shape.allows(Candidate(4, 8))
    assert layer_shape(torch.nn.Conv2d(32, 64, 3)).allows(Candidate(4, 8, 32))
    depthwise = layer_shape(torch.nn.Conv2d(32, 32, 3, groups=32))
    assert not depthwise.allows(Candidate(4, 8, 32)) and depthwise.allows(Candidate(4, 8))


def test_fingerprint_changes_with_the_calibrated_recipe():
    """A cached analysis made with other clipping/smoothing settings is not reused."""
    from diffq.planning import CalibrationOptions

    fingerprint = runner.fingerprint
    args = (object(), ["a", "b"], [Candidate(4, 8)], ["a prompt"], 4, 0, {})
    assert fingerprint(*args) == fingerprint(*args, CalibrationOptions())
    assert fingerprint(*args) != fingerprint(*args, CalibrationOptions(smoothing=False))


def test_compare_plans_scores_each_plan_and_leaves_the_denoiser_float():
    from diffq.pipelines.plan_check import compare_plans

    pipe = tiny_pixart_pipeline()
    kwargs = tiny_call_kwargs(pipe)
    before = run_tiny(pipe, steps=2)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **kwargs)
    plans = {p: diffq.allocate(pipe, stats, preset=p, progress=False) for p in ("w8a8", "w4a4-rtn")}
    scores = compare_plans(pipe, plans, stats, TINY_PROMPTS[:2], num_inference_steps=2, progress=False, **kwargs)
    assert scores["w8a8"] > scores["w4a4-rtn"] > 0
    assert not any(isinstance(m, (diffq.QuantizedLinear, diffq.QuantizedConv2d)) for m in pipe.transformer.modules())
    np.testing.assert_array_equal(run_tiny(pipe, steps=2), before)


def lying_sensitivity(pipe):
    """Scores that call 2-bit weights free and 4-bit ones ruinous: the program's plan is mostly w2."""
    denoiser = denoiser_of(pipe)
    layers, _ = adapter_for(denoiser).layers(denoiser)
    groups = {n: adapter_for(denoiser).group_of(n) for n in layers}
    scores = {
        n: {"w2a8": 90.0, "w4a8": 10.0, "w8a8": 90.0} if g == "quality" else {"w2a8": 1.0, "w4a8": 0.5, "w8a8": 1.0}
        for n, g in groups.items()
    }
    return Sensitivity("hand-made", groups, scores)


def test_mixed_keeps_the_uniform_plan_when_its_own_plan_is_worse_end_to_end():
    kwargs = tiny_call_kwargs(tiny_pixart_pipeline())
    common = dict(calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False, **kwargs)
    unchecked = tiny_pixart_pipeline()
    diffq.quantize(unchecked, "w4.0a8", sensitivity=lying_sensitivity(unchecked), check=False, **common)
    assert 2 in {c.w_bits for c in plan_of(unchecked.transformer).layers.values()}
    assert plan_of(unchecked.transformer).note == ""

    checked = tiny_pixart_pipeline()
    with pytest.warns(diffq.PlanCheckWarning, match="uniform w4a8 kept"):
        diffq.quantize(checked, "w4.0a8", sensitivity=lying_sensitivity(checked), **common)
    plan = plan_of(checked.transformer)
    assert {c.w_bits for c in plan.layers.values()} == {4} and plan.preset == "w4.0a8"
    assert "dB for the mixed plan" in plan.note and plan.note in plan.table()
    assert diffq.QuantPlan.from_json(plan.to_json()).note == plan.note
    assert_installed_like_a_fresh_conversion(checked, **common)


def test_checked_mixed_plan_quantizes_the_temporal_layers_too():
    """With temporal_bits, the layers the check installs and the temporal layers it never saw both end
    up quantized, as a fresh conversion of the kept plan would give them."""
    common = dict(calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                  **tiny_call_kwargs(tiny_sd_pipeline()))
    pipe = tiny_sd_pipeline()
    temporal = adapter_for(pipe.unet).temporal_layers(pipe.unet)
    with pytest.warns(diffq.PlanCheckWarning):
        diffq.quantize(pipe, "w4.0a8", sensitivity=lying_sensitivity(pipe), temporal_bits=8, **common)
    plan = plan_of(pipe.unet)
    assert temporal and {plan.layers[n].w_bits for n in temporal} == {8} and not set(temporal) & set(plan.skipped)
    assert_installed_like_a_fresh_conversion(pipe, builder=tiny_sd_pipeline, **common)


def assert_installed_like_a_fresh_conversion(
    pipe, calibration, num_calibration_steps, progress, builder=tiny_pixart_pipeline, **kwargs
):
    """The layers the check left installed equal converting the kept plan on a fresh float copy."""
    plan = plan_of(denoiser_of(pipe))
    fresh = builder()
    stats = diffq.calibrate(fresh, calibration, num_inference_steps=num_calibration_steps, progress=False, **kwargs)
    diffq.convert(fresh, plan, stats, progress=False)
    for name in plan.layers:
        assert isinstance(denoiser_of(pipe).get_submodule(name), (diffq.QuantizedLinear, diffq.QuantizedConv2d))
    np.testing.assert_array_equal(run_tiny(pipe, steps=2), run_tiny(fresh, steps=2))


def test_uniform_alternative_reuses_the_mixed_plans_tuned_layers_unchanged():
    from diffq.planning import PlanInputs, uniform_alternative
    from diffq.presets import get_preset

    pipe = tiny_pixart_pipeline()
    kwargs = tiny_call_kwargs(pipe)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:2], num_inference_steps=2, progress=False, **kwargs)
    sensitivity = lying_sensitivity(pipe)
    for name, group in sensitivity.groups.items():  # content layers now prefer 4 bits to 2
        if group == "content":
            sensitivity.scores[name] = {"w2a8": 0.5, "w4a8": 0.99, "w8a8": 0.995}
    mixed = diffq.allocate(pipe, stats, preset="w4.0a8", sensitivity=sensitivity, check=False, progress=False)
    assert {c.w_bits for c in mixed.layers.values()} >= {2, 4}  # some layers share uniform's candidate
    adapter = adapter_for(pipe.transformer)
    layers, kept = adapter.layers(pipe.transformer)
    inputs = PlanInputs(layers, kept, stats, adapter.concat_splits(pipe.transformer))
    args = (get_preset("w4.0a8"), inputs, sensitivity, None)
    reused, fresh = uniform_alternative(*args, planned=mixed), uniform_alternative(*args)
    assert reused[0] == fresh[0] == Candidate(4, 8)
    assert reused[1].layers == fresh[1].layers


def test_plan_check_psnr_ranks_broken_images_last():
    from diffq.pipelines.plan_check import MAX_PSNR_DB, psnr_db

    reference = torch.rand(2, 3, 8, 8)
    assert psnr_db(reference, reference) == MAX_PSNR_DB
    assert 0 < psnr_db(reference * 0.9, reference) < MAX_PSNR_DB
    assert psnr_db(torch.full_like(reference, float("nan")), reference) == -math.inf
