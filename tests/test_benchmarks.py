"""The benchmark scripts in benchmarks/: byte arithmetic against real quantized models, peer byte
counting, failing peers carried as rows, and the speed script's code paths on tiny models.

Real-size models never run here: memory.py's arithmetic is checked on the tiny pipelines of
`diffq.pipelines.testing` (the same arithmetic then runs on the meta-device SD 1.5/SDXL/PixArt/Flux).
The peer tests skip when the `bench` extra (optimum-quanto, torchao) is not installed.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from test_metrics import PixelClassifier
from torch import nn

import diffq
from diffq.pipelines import denoiser_of
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import TINY_PROMPTS, tiny_call_kwargs, tiny_pixart_pipeline, tiny_sd_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import additivity  # noqa: E402
import bits_curve  # noqa: E402
import cpu  # noqa: E402
import fid_robustness  # noqa: E402
import memory  # noqa: E402
import peers  # noqa: E402
import quality  # noqa: E402
import quantize_memory  # noqa: E402
import speed  # noqa: E402

UNIFORM = ["w8a8", "w4a8", "w4a16", "w4a4", "w8a8-rtn", "w4a8-rtn", "w4a4-rtn", "w8a16", "w4a8:temporal_bits=4"]


def _quantized(builder, spec: str):
    """(float copy of the denoiser, pipeline quantized with ``spec``, e.g. ``w4a8:temporal_bits=4``)
    on a tiny pipeline."""
    preset, temporal_bits = memory.split_spec(spec)
    pipe = builder()
    float_copy = copy.deepcopy(denoiser_of(pipe))
    diffq.quantize(pipe, preset, calibration=TINY_PROMPTS[:2], num_calibration_steps=2, progress=False,
                   temporal_bits=temporal_bits, **tiny_call_kwargs(pipe))
    return float_copy, pipe


def _without_extras(configs: dict) -> dict:
    from dataclasses import replace

    return {n: replace(c, a_groups=1, smooth_alpha=None, bos=False, a_clip="minmax", w_clip="minmax")
            for n, c in configs.items()}


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_pixart_pipeline], ids=["unet", "dit"])
def test_memory_arithmetic_matches_weight_bytes(builder):
    """memory.py's per-layer arithmetic gives diffq.weight_bytes exactly, for every preset's real plan;
    its statistics-free estimate is exact for -rtn presets and an upper bound otherwise."""
    for preset in UNIFORM:
        float_model, pipe = _quantized(builder, preset)
        plan = plan_of(denoiser_of(pipe))
        actual = diffq.weight_bytes(pipe)
        assert memory.planned_bytes(float_model, plan.layers) == actual, preset
        text_bos = hasattr(pipe, "unet")  # CLIP adds a BOS token; T5 does not
        estimate = memory.preset_configs(float_model, preset, text_bos=text_bos)
        assert set(estimate) == set(plan.layers)
        if preset.endswith("-rtn"):
            assert estimate == plan.layers, preset
        else:
            assert memory.planned_bytes(float_model, estimate) >= actual, preset
            assert _without_extras(estimate) == _without_extras(plan.layers), preset
        if preset == "w4a4":
            assert any(c.rank for c in plan.layers.values())


def test_mixed_precision_bytes_and_bound():
    """A real mixed plan (allocation on synthetic scores, a mix of 2/3/4/8 bits and ranks): exact bytes,
    and under the bound memory.py reports for its budget."""
    pipe = tiny_sd_pipeline()
    float_unet = copy.deepcopy(pipe.unet)
    call = tiny_call_kwargs(pipe)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:2], num_inference_steps=2, progress=False, **call)
    sensitivity = speed.synthetic_sensitivity(pipe.unet, "mixed")
    plan = diffq.allocate(pipe, stats, preset="mixed", budget=3.5, sensitivity=sensitivity, progress=False)
    assert len({(c.w_bits, c.rank) for c in plan.layers.values()}) > 1  # really mixed
    diffq.convert(pipe, plan, stats, progress=False)
    actual = diffq.weight_bytes(pipe)
    assert memory.planned_bytes(float_unet, plan.layers) == actual
    assert actual <= memory.mixed_bound(float_unet, "mixed", budget=3.5)
    assert memory.mixed_bound(float_unet, "w3.5a8") <= memory.mixed_bound(float_unet, "w4.0a8")


def test_memory_script_on_meta_models(tmp_path, capsys):
    assert memory.main(["--models", "sd15", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["fp16"]["params"] == 859_520_964 and rows["fp16"]["bytes"] == 2 * 859_520_964
    assert rows["fp16"]["vs_4bit_limit"] == pytest.approx(4.0)
    assert rows["w8a8"]["bytes"] < rows["fp16"]["bytes"] * 0.55
    assert rows["w4a8"]["bytes"] < rows["w8a8"]["bytes"] < rows["fp16"]["bytes"]
    assert rows["w4a4"]["bytes"] > rows["w4a8"]["bytes"]  # the 16-bit branch
    assert rows["w3.5a8"]["bytes"] < rows["w4.0a8"]["bytes"] and rows["w3.5a8"]["bound"]
    assert rows["w4a8:temporal_bits=4"]["bytes"] < rows["w4a8"]["bytes"]  # the ResNet time projections shrink
    assert rows["w8a8:temporal_bits=8"]["bytes"] < rows["w8a8"]["bytes"]
    assert set(rows) >= set(memory.PEERS)
    out = capsys.readouterr().out
    assert "SD 1.5 UNet" in out and "Machine:" in out and "no GPU" in out or torch.cuda.is_available()
    assert (tmp_path / "results.md").read_text().startswith("**Denoiser weight bytes")


def _tiny_linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 160), nn.GELU(), nn.Linear(160, 96, bias=False), nn.LayerNorm(96),
                         nn.Conv2d(8, 16, 3))


@pytest.mark.parametrize(("bits", "activations"), [(8, False), (8, True), (4, False)])
def test_quanto_bytes_are_counted_from_packed_tensors(bits, activations):
    q = pytest.importorskip("optimum.quanto")
    model = _tiny_linear_model()
    expected = memory.quanto_bytes(model, bits, activations=activations)
    dense = memory.stored_bytes(model)
    q.quantize(model, weights=q.qint8 if bits == 8 else q.qint4, activations=q.qint8 if activations else None)
    if activations:
        with q.Calibration():
            model[0](torch.randn(4, 256))
    q.freeze(model)
    counted = memory.stored_bytes(model)
    assert counted == expected
    assert counted < dense * (0.3 if bits == 8 else 0.2)
    assert diffq.weight_bytes(model) > counted  # the dense size quanto's tensor subclasses report


def test_quanto_bytes_on_a_unet():
    q = pytest.importorskip("optimum.quanto")
    unet = tiny_sd_pipeline().unet
    expected = memory.quanto_bytes(unet, 4)
    q.quantize(unet, weights=q.qint4)
    q.freeze(unet)
    assert memory.stored_bytes(unet) == expected


@pytest.mark.parametrize("config", ["int8", "int8-dynamic", "intx4"])
def test_torchao_bytes_are_counted_from_inner_tensors(config):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    model = _tiny_linear_model()
    make = {"int8": peers._int8_weight_only, "int8-dynamic": peers._int8_dynamic,
            "intx4": peers._intx4_weight_only}[config]
    expected = (memory.torchao_intx4_bytes if config == "intx4" else memory.torchao_int8_bytes)(model)
    dense = memory.stored_bytes(model)
    quantize_(model, make())
    counted = memory.stored_bytes(model)
    assert counted == expected
    assert counted < dense * 0.5
    assert model[0](torch.randn(2, 256)).shape == (2, 160)  # it still runs


def test_torchao_int4_arithmetic():
    """Int4WeightOnlyConfig does not run on a CPU; its arithmetic: codes packed two per byte, a 16-bit
    scale and zero point per group of 128, layers whose rows 128 does not divide left alone."""
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(96, 32)).to(torch.bfloat16)
    dense = memory.stored_bytes(model)
    expected = dense - 256 * 64 * 2 + 256 * 64 // 2 + 2 * (64 * 2) * 2
    assert memory.torchao_int4_bytes(model) == expected


def _tiny_factory(name: str):
    return tiny_sd_pipeline()


EVAL_OPTIONS = dict(
    pipeline_factory=_tiny_factory,
    prompts=[(f"a handwritten digit {d}", d) for d in range(10)],
    call_kwargs={"height": 32, "width": 32, "guidance_scale": 1.0},
    classifier=PixelClassifier(),
    steps=2,
    batch_size=2,
)


def test_quality_lists_a_failing_peer_with_its_error(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        def apply(pipe):
            raise RuntimeError("no int4 kernel\nfor this device")

        return apply

    monkeypatch.setitem(quality.PEERS, "broken-w4a16", broken)
    peers = ["broken-w4a16", "quanto-w4a16"]
    if not torch.cuda.is_available():
        peers.append("torchao-w4a16")  # torchao's int4 weight-only needs CUDA (or is not installed): fails here
    context = quality.PeerContext(call_kwargs={"height": 32, "width": 32}, steps=2)
    data = quality.run(["tiny-sd"], ["w8a16"], peers, 2, tmp_path, progress=False, peer_context=context,
                       **EVAL_OPTIONS)
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "w8a16", *peers]
    assert rows["broken-w4a16"]["status"] == "RuntimeError: no int4 kernel for this device"
    assert rows["broken-w4a16"]["psnr_vs_fp"] is None and rows["broken-w4a16"]["weight_bytes"] is None
    assert rows["w8a16"]["status"] == "ok" and rows["w8a16"]["library"] == "diffq"
    if "torchao-w4a16" in rows:
        assert rows["torchao-w4a16"]["status"] != "ok" and "Error" in rows["torchao-w4a16"]["status"]
    try:
        import optimum.quanto  # noqa: F401

        assert rows["quanto-w4a16"]["status"] == "ok"
        assert rows["quanto-w4a16"]["weight_bytes"] < 0.3 * rows["fp"]["weight_bytes"]
    except ImportError:
        assert "ModuleNotFoundError" in rows["quanto-w4a16"]["status"]
    text = (tmp_path / "results.md").read_text()
    assert "`broken-w4a16` on tiny-sd: RuntimeError: no int4 kernel for this device" in text
    assert "Machine:" in text and text in capsys.readouterr().out + "\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == data["rows"] and saved["machine"]["cpu_count"] >= 1
    assert (tmp_path / "quality_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "tiny-sd" / "report.md").read_text()
    assert "`broken-w4a16` did not run: RuntimeError" in report


def test_quality_prompt_sets_hold_out_the_calibration_prompts():
    from diffq.pipelines.reference import eval_prompts

    calibration = eval_prompts(quality.CALIBRATION_PROMPTS)
    held_out = quality.prompts_of("held-out", 20)
    assert len(held_out) == 20 and not set(held_out) & set(calibration)
    assert quality.prompts_of("calibration", 20) == calibration
    assert quality.prompts_of("bundled", 20)[:8] == calibration
    with pytest.raises(ValueError, match="unknown prompt set"):
        quality.prompts_of("test", 4)


def test_quality_combines_runs_of_other_models_and_other_methods(tmp_path):
    def part(folder, model, methods, num_images=4):
        rows = [{"model": model, "method": m, "spec": m, "library": "–" if m == "fp" else "diffq", "fid": 1.0,
                 "alignment": 1.0, "psnr_vs_fp": None if m == "fp" else 30.0, "ssim_vs_fp": None,
                 "weight_bytes": 100, "seconds": 1.0, "vs_fp": 1.0, "scope": None, "status": "ok"} for m in methods]
        report = {"feature_extractor": "digit-classifier", "results": {m: {} for m in methods}}
        data = {"machine": {}, "num_images": num_images, "seed": 0, "prompt_set": "held-out", "rows": rows,
                "reports": {model: report}}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(data))
        return tmp_path / folder

    a, b = part("a", "digits-sd", ["fp", "w4a8"]), part("b", "digits-sd", ["fp", "w8a16"])
    data = quality.combine([a, b, part("c", "digits-dit", ["fp", "w4a8"])], tmp_path / "all")
    assert [(r["model"], r["method"]) for r in data["rows"]] == [
        ("digits-sd", "fp"), ("digits-sd", "w4a8"), ("digits-sd", "w8a16"), ("digits-dit", "fp"), ("digits-dit", "w4a8")]
    assert set(data["reports"]["digits-sd"]["results"]) == {"fp", "w4a8", "w8a16"}
    assert (tmp_path / "all" / "results.md").exists() and (tmp_path / "all" / "quality_vs_bytes.png").exists()
    with pytest.raises(ValueError, match="different images"):
        quality.combine([a, part("d", "digits-dit", ["fp"], num_images=8)], tmp_path / "bad")


def test_quality_passes_the_sensitivity_file_to_mixed_presets(tmp_path):
    from diffq.metrics.evaluate import preset_spec

    specs = quality.preset_specs(["w4a8", "w3.5a8", "w4.0a8:budget=4"], "/s/sens.json")
    assert specs == ["w4a8", "w3.5a8:sensitivity=/s/sens.json", "w4.0a8:budget=4;sensitivity=/s/sens.json"]
    assert preset_spec(specs[1]) == ("w3.5a8", {"sensitivity": "/s/sens.json"})
    assert quality.parse_sensitivity(["digits-dit=b.json", "a.json"], ["digits-sd", "digits-dit"]) == {
        "digits-sd": "a.json", "digits-dit": "a.json"}
    assert quality.parse_sensitivity(["digits-dit=b.json"], ["digits-sd", "digits-dit"]) == {"digits-dit": "b.json"}
    with pytest.raises(ValueError, match="not one of the models"):
        quality.parse_sensitivity(["digits-xl=b.json"], ["digits-sd"])


def test_speed_phases_match_diffq_quantize():
    """speed.py's calibration/allocation/conversion steps make what diffq.quantize makes of a bare module."""
    unet = memory.build(speed.TINY_UNET, device="cpu", dtype=torch.float32)
    inputs = speed.calibration_inputs(unet, 2, 8)
    for preset in ("w8a8", "w4a8-rtn"):
        a, b = copy.deepcopy(unet), copy.deepcopy(unet)
        phases = speed.time_diffq(a, preset, inputs)
        assert set(phases) == {"calibration", "allocation", "conversion"}
        diffq.quantize(b, preset, calibration=inputs, progress=False)
        assert diffq.weight_bytes(a) == diffq.weight_bytes(b)
        assert plan_of(a).layers == plan_of(b).layers
        with torch.no_grad():
            assert torch.equal(a(**inputs[0]).sample, b(**inputs[0]).sample)


def test_quantize_memory_measures_each_stage_and_compares_the_checkpoints(tmp_path, capsys):
    """quantize_memory.py on the tiny pipeline: both --low-memory settings run ``diffq quantize`` in a
    fresh process, every stage reports its peaks, the two checkpoints hash the same (exit 0), and a
    second run resumes from the finished runs instead of measuring again."""
    out = tmp_path / "qm"
    argv = ["--model", "tiny", "--preset", "w8a8", "--prompts", "1", "--steps", "1", "--low-memory", "off", "on",
            "--out", str(out)]
    assert quantize_memory.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["identical"] and set(data["results"]) == {"off", "on"}
    for result in data["results"].values():
        assert result["code"] == 0 and {"load", "calibrate", "plan", "convert", "save"} <= set(result["stages"])
        assert all(peak["rss"] >= 0 and peak["anon"] >= 0 for peak in result["stages"].values())
        assert len(result["state_sha256"]) == 64
    assert "Quantized checkpoints identical across settings: yes" in (out / "results.md").read_text()
    capsys.readouterr()
    assert quantize_memory.main(argv) == 0
    assert capsys.readouterr().err.count("measured earlier") == 2


def test_speed_script_smoke(tmp_path, capsys):
    argv = ["--unet", "tiny", "--presets", "w4a8-rtn,w3.5a8", "--peers", "torchao-w4a16", "--calibration-samples",
            "1", "--latent-size", "8", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in data["cpu"]["rows"]}
    assert rows["w3.5a8"]["status"] == "ok" and rows["w3.5a8"]["phases"]["allocation"] > 0
    assert rows["w4a8-rtn"]["weight_bytes"] < memory.stored_bytes(memory.build(speed.TINY_UNET))  # vs fp16
    if not torch.cuda.is_available():
        assert rows["torchao-w4a16"]["status"] != "ok"
        assert data["cuda"] is None
        assert "not measured — no CUDA device" in capsys.readouterr().out


def test_latency_rows_run_sdxl_and_flux_layouts_on_the_cpu():
    """The CUDA latency path's inputs fit SDXL's and Flux's layouts (tiny configs, on the CPU)."""
    sdxl = memory.ModelSpec("tiny SDXL", "UNet2DConditionModel", dict(
        block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=[2, 4],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, transformer_layers_per_block=[1, 2],
        use_linear_projection=True, sample_size=8), True)
    flux = memory.ModelSpec("tiny Flux", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6]), False)
    rows = speed.latency_rows({"sdxl": sdxl, "flux": flux}, ["w8a8-rtn"], device="cpu", dtype=torch.float32,
                              reps=1, calibration_samples=1, shapes={"sdxl": (8, 7, 2), "flux": (8, 5, 1)})
    assert [(r["model"], r["method"], r["status"]) for r in rows] == [
        ("tiny SDXL", "float32", "ok"), ("tiny SDXL", "w8a8-rtn", "ok"),
        ("tiny Flux", "float32", "ok"), ("tiny Flux", "w8a8-rtn", "ok")]
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_mixed_preset_runs_from_a_sensitivity_file(tmp_path, monkeypatch):
    """`--sensitivity` reaches diffq.quantize: the mixed preset allocates from the file, no analysis runs."""
    import diffq.api

    sensitivity = speed.synthetic_sensitivity(tiny_sd_pipeline().unet, "w3.5a8")
    sensitivity.save(tmp_path / "sens.json")

    def no_analysis(*args, **kwargs):
        raise AssertionError("the sensitivity analysis ran although a file was given")

    monkeypatch.setattr(diffq.api, "_measure_sensitivity", no_analysis)
    data = quality.run(["tiny-sd"], ["w3.5a8"], [], 2, tmp_path / "out", progress=False,
                       sensitivity={"tiny-sd": str(tmp_path / "sens.json")}, **EVAL_OPTIONS)
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["w3.5a8"]["status"] == "ok" and rows["w3.5a8"]["spec"].endswith("sens.json")
    assert rows["w3.5a8"]["weight_bytes"] < 0.5 * rows["fp"]["weight_bytes"]


def test_bits_curve_reads_mixed_and_uniform_rows(tmp_path):
    def row(psnr, fid):
        return {"fid": fid, "alignment": 1.0, "clip_score": None, "psnr_vs_fp": psnr, "ssim_vs_fp": None,
                "weight_bytes": 1, "seconds": 1.0}

    report = {"model": "m", "results": {"fp": row(None, 1.0), "w4a8": row(30.0, 1.2), "w4a8-rtn": row(28.0, 1.3),
                                        "w3.5a8": row(29.0, 1.25), "w4.0a8": row(31.0, 1.1), "w4a4": row(25.0, 2.0)}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "report.json").write_text(json.dumps(report))
    assert bits_curve.main([str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["preset"], r["kind"], r["bits"]) for r in rows] == [
        ("w3.5a8", "mixed", 3.5), ("w4.0a8", "mixed", 4.0), ("w4a8", "uniform", 4.0), ("w4a8-rtn", "rtn", 4.0)]
    assert (tmp_path / "out" / "bits_curve.png").stat().st_size > 0
    del report["results"]["w3.5a8"], report["results"]["w4.0a8"]
    (tmp_path / "m" / "report.json").write_text(json.dumps(report))
    assert bits_curve.main([str(tmp_path / "m"), "--out", str(tmp_path / "out2")]) == 2


def test_additivity_predictions_and_plan(tmp_path):
    assert additivity.main(["--model", "digits-dit", "--num-prompts", "1", "--steps", "2", "--top", "1",
                            "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "digits-dit" / "results.json").read_text())
    alone, rows = result["alone"], {r["case"]: r for r in result["rows"]}
    assert rows["uniform 4-bit"]["predicted_mse"] == pytest.approx(sum(e["4"] for e in alone.values()))
    assert all(e["3"] > 0 and e["8"] >= 0 for e in alone.values())
    plan = result["plan"]
    model = denoiser_of(diffq.load("digits-dit"))
    params = {n: model.get_submodule(n).weight.numel() for n in plan}
    assert sum(b * params[n] for n, b in plan.items()) <= 4.0 * sum(params.values())  # the budget holds
    [solved] = [r for c, r in rows.items() if c.startswith("solved plan")]
    assert solved["predicted_mse"] == pytest.approx(sum(alone[n][str(b)] for n, b in plan.items()))
    assert "| uniform 4-bit |" in (tmp_path / "digits-dit" / "results.md").read_text()


def test_fid_robustness_matches_diffq_eval_and_kid_is_unbiased(tmp_path):
    from diffq.metrics.evaluate import evaluate
    from diffq.metrics.fid import kernel_distance

    assert fid_robustness.main(["--model", "digits-dit", "--presets", "fp,w8a8-rtn", "--num-images", "4",
                                "--bootstrap", "5", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "digits-dit" / "results.json").read_text())
    held_out, train = result["references"]["classifier_test"], result["references"]["diffusion"]
    assert (held_out["num_real"], train["num_real"]) == (216, 1078)
    # the same images as diffq eval: its FIDs against the held-out digits
    report = evaluate("digits-dit", ["fp", "w8a8-rtn"], 4, fid_bootstrap=0, progress=False)
    for preset in ("fp", "w8a8-rtn"):
        assert held_out["scores"][preset]["fid"] == pytest.approx(report["results"][preset]["fid"], rel=1e-9)
    [pair] = held_out["kid_differences"]
    assert pair["difference"] == pytest.approx(held_out["scores"]["fp"]["kid"] - held_out["scores"]["w8a8-rtn"]["kid"])
    # KID: the unbiased MMD² of a cubic kernel, written out pair by pair
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64) + 0.5

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(x[:1], y)


def test_cpu_step_benchmark_times_every_method_against_float32(tmp_path, capsys):
    argv = ["--models", "tiny", "--presets", "w8a8-rtn", "--peers", "sdnq-int8,nope", "--threads", "1",
            "--reps", "1", "--reference", "--out", str(tmp_path)]
    assert cpu.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"float32", "bfloat16", "w8a8-rtn", "w8a8-rtn (reference kernels)", "sdnq-int8", "nope"}
    assert rows["float32"]["speedup"] == 1.0 and rows["w8a8-rtn"]["ms"] > 0
    assert rows["w8a8-rtn"]["speedup"] == pytest.approx(rows["float32"]["ms"] / rows["w8a8-rtn"]["ms"])
    assert rows["w8a8-rtn"]["weight_bytes"] == rows["w8a8-rtn (reference kernels)"]["weight_bytes"]
    assert rows["nope"]["ms"] is None and "nope" in rows["nope"]["status"]  # a failing peer is a row with its error
    assert "| tiny SD-layout UNet | w8a8-rtn | 1 |" in capsys.readouterr().out
