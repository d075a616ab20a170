"""The demo's logic without a browser: validation, call arguments, metrics, caching, handlers, the page."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import diffq
from diffq.pipelines import denoiser_of
from diffq.pipelines.serialization import plan_of

ROOT = Path(__file__).resolve().parents[1]


def load_app():
    """``app.py`` from the repository root as the module ``app``."""
    module = sys.modules.get("app")
    if module is not None and Path(module.__file__).resolve() == ROOT / "app.py":
        return module
    spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    return module


app = load_app()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    from diffq.pipelines.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("app") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return str(folder)


def tiny_models(**kwargs) -> app.DemoModels:
    return app.DemoModels(call_kwargs={"height": 32, "width": 32}, calibration_prompts=["a red cat", "a digit 7"],
                          calibration_steps=2, progress_bars=False, **kwargs)


@pytest.fixture(scope="module")
def models() -> app.DemoModels:
    return tiny_models()


@pytest.fixture(scope="module")
def comparison(models, tiny_folder):
    return models.generate(app.validate_request(tiny_folder, "w4a8", "a red cat", 3, 3))


# -- validation -------------------------------------------------------------------------------------------------


def test_validate_request_normalizes():
    request = app.validate_request(" digits-sd ", "w8a8", "  a digit 7 ", 5.0, 20.0)
    assert request == app.Request("digits-sd", "w8a8", "a digit 7", 5, 20)


@pytest.mark.parametrize(("value", "bits"), [(None, None), ("", None), ("16", None), ("8", 8), (" 4-bit ", 4), (8, 8)])
def test_validate_temporal(value, bits):
    assert app.validate_temporal(value) == bits
    assert app.validate_request("digits-sd", "w4a8", "a 7", 0, 4, value).temporal_bits == bits


def test_validate_temporal_rejects():
    with pytest.raises(app.DemoInputError, match="choose 16 .kept., 8 or 4 bits"):
        app.validate_temporal("2")


@pytest.mark.parametrize(
    ("model", "preset", "prompt", "seed", "steps", "message"),
    [
        ("", "w4a8", "a 7", 0, 4, "Choose a model"),
        ("digits-sd", "w5a5", "a 7", 0, 4, "Unknown preset 'w5a5'"),
        ("digits-sd", None, "a 7", 0, 4, "Unknown preset"),
        ("digits-sd", "w4a8", "   ", 0, 4, "prompt is empty"),
        ("digits-sd", "w4a8", "a 7", -1, 4, "seed must be between 0"),
        ("digits-sd", "w4a8", "a 7", None, 4, "seed is empty"),
        ("digits-sd", "w4a8", "a 7", 1.5, 4, "not a whole number"),
        ("digits-sd", "w4a8", "a 7", "x", 4, "not a number"),
        ("digits-sd", "w4a8", "a 7", 0, 0, "between 1 and 100"),
        ("digits-sd", "w4a8", "a 7", 0, app.MAX_STEPS + 1, "between 1 and 100"),
        ("digits-sd", "w4a8", "a 7", 0, float("nan"), "not a whole number"),
    ],
)
def test_validate_request_rejects(model, preset, prompt, seed, steps, message):
    with pytest.raises(app.DemoInputError, match=message):
        app.validate_request(model, preset, prompt, seed, steps)


# -- call arguments, metrics, display ---------------------------------------------------------------------------


def test_call_kwargs_of_bundled_models_and_folders_made_from_them(tmp_path):
    reference = pytest.importorskip("diffq.pipelines.reference")
    expected = getattr(reference, "DEFAULT_CALL_KWARGS", {}).get("digits-sd")
    if expected is None:
        pytest.skip("no DEFAULT_CALL_KWARGS for digits-sd yet")
    assert app.default_call_kwargs("digits-sd") == expected
    assert app.default_steps("digits-sd") == min(expected["num_inference_steps"], app.MAX_STEPS)
    (tmp_path / "diffq_report.json").write_text(json.dumps({"model": "digits-sd", "preset": "w4a8"}))
    assert app.source_model(str(tmp_path)) == "digits-sd"
    assert app.default_call_kwargs(str(tmp_path)) == expected
    assert app.default_call_kwargs("someone/some-model") == {}
    assert app.default_steps("someone/some-model") is None


def test_accepted_kwargs_drops_what_the_pipeline_does_not_take():
    class Pipe:
        def __call__(self, prompt, height=None, width=None):
            pass

    class Open:
        def __call__(self, prompt, **kwargs):
            pass

    kwargs = {"height": 32, "use_resolution_binning": False}
    assert app.accepted_kwargs(Pipe(), kwargs) == {"height": 32}
    assert app.accepted_kwargs(Open(), kwargs) == kwargs


def test_fidelity():
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 3), dtype=np.float32)
    noisy = np.clip(image + rng.normal(0, 0.05, image.shape).astype(np.float32), 0, 1)
    psnr, ssim = app.fidelity(noisy, image)
    assert 20 < psnr < 35 and 0 < ssim < 1
    mse = float(np.mean((noisy.astype(np.float64) - image) ** 2))
    assert psnr == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)  # the written definition
    same_psnr, same_ssim = app.fidelity(image, image)
    assert same_psnr == pytest.approx(100.0) and same_ssim == pytest.approx(1.0)


def test_format_bytes_and_display():
    assert app.format_bytes(512) == "512 B"
    assert app.format_bytes(1536) == "1.50 KiB"
    assert app.format_bytes(3 * 2**20) == "3.00 MiB"
    shown = app.for_display(np.full((32, 32, 3), 0.5, np.float32))
    assert shown.size == (256, 256) and shown.getpixel((0, 0)) == (128, 128, 128)
    assert app.for_display(np.zeros((512, 512, 3), np.float32)).size == (512, 512)


def test_escape_markdown_keeps_paths_literal():
    assert app.escape_markdown("/tmp/my_model*x") == "/tmp/my\\_model\\*x"
    assert "Error" in app.error_markdown(diffq.DiffQError("bad <thing>")) and "\\<thing\\>" in app.error_markdown(
        diffq.DiffQError("bad <thing>")
    )


# -- generation and caching -------------------------------------------------------------------------------------


def test_generate_gives_both_images_and_metrics(comparison):
    assert comparison.full.shape == comparison.quantized.shape == (32, 32, 3)
    assert comparison.preset == "w4a8"
    assert comparison.quantized_bytes < comparison.full_bytes
    assert comparison.full_seconds > 0 and comparison.quantized_seconds > 0
    assert np.isfinite(comparison.psnr) and 10 < comparison.psnr <= 100 and 0 < comparison.ssim <= 1
    assert any("built in" in note for note in comparison.notes)
    table = comparison.metrics_markdown()
    for needle in ("denoiser weights", "MiB", "smaller", "seconds per image", "dB", "quantized (w4a8)"):
        assert needle in table


def test_second_request_comes_from_the_cache_with_the_same_images(models, tiny_folder, comparison):
    q_pipe, preset, cached = models.quantized(tiny_folder, "w4a8")
    assert cached and preset == "w4a8"
    again = models.generate(app.validate_request(tiny_folder, "w4a8", "a red cat", 3, 3))
    assert any("from the cache" in note for note in again.notes)
    np.testing.assert_array_equal(again.full, comparison.full)
    np.testing.assert_array_equal(again.quantized, comparison.quantized)
    assert models.quantized(tiny_folder, "w4a8")[0] is q_pipe
    # the cached float pipeline was never quantized in place
    assert plan_of(denoiser_of(models.full_precision(tiny_folder)[0])) is None
    assert plan_of(denoiser_of(q_pipe)) is not None


def test_other_seed_gives_other_images(models, tiny_folder, comparison):
    other = models.generate(app.validate_request(tiny_folder, "w4a8", "a red cat", 4, 3))
    assert not np.array_equal(other.full, comparison.full)


def test_rtn_preset_needs_no_calibration(tiny_folder):
    models = tiny_models()
    result = models.generate(app.validate_request(tiny_folder, "w8a16-rtn", "a cat", 0, 2))
    assert result.preset == "w8a16-rtn" and result.psnr > 20
    assert tiny_folder not in models._stats  # weight-only round-to-nearest skips calibration


def test_caches_drop_the_least_recently_used(tiny_folder):
    models = tiny_models(max_quantized=1)
    first = models.quantized(tiny_folder, "w8a16-rtn")[0]
    models.quantized(tiny_folder, "w4a16-rtn")
    assert list(models._quantized) == [(tiny_folder, "w4a16-rtn", None)]
    assert models.quantized(tiny_folder, "w8a16-rtn")[0] is not first


def test_quantized_folder_compares_with_its_source(models, tiny_folder, tmp_path):
    pipe = diffq.load(tiny_folder)
    diffq.quantize(pipe, "w8a16-rtn", progress=False)
    quantized = tmp_path / "tiny-w8a16"
    diffq.save(pipe, quantized)
    lone = app.validate_request(str(quantized), "w4a8", "a cat", 0, 2)
    result = models.generate(lone)
    assert result.preset == "w8a16-rtn" and result.full is None and result.psnr is None
    assert any("do not apply" in note for note in result.notes)
    assert any("no full-precision image" in note for note in result.notes)
    assert "—" in result.metrics_markdown()

    (quantized / "diffq_report.json").write_text(json.dumps({"model": tiny_folder, "preset": "w8a16-rtn"}))
    sourced = app.DemoModels(call_kwargs={"height": 32, "width": 32}, progress_bars=False)
    result = sourced.generate(lone)
    assert result.full is not None and result.psnr > 20
    assert any("quantized from" in note for note in result.notes)


def test_plan_view(models, tiny_folder, comparison):
    view = models.plan(tiny_folder, "w4a8")
    assert view.preset == "w4a8" and view.quantized_layers > 0 and view.kept_layers > 0
    assert view.bits_chart.is_file() and view.ranges_chart is not None and view.ranges_chart.is_file()
    assert "int4" in view.table and "kept" in view.table


# -- handlers: what the page shows -----------------------------------------------------------------------------


def test_handle_generate_success(models, tiny_folder, comparison):
    full, quantized, metrics, status = app.handle_generate(models, tiny_folder, "w4a8", "a red cat", 3, 3)
    assert full.size == quantized.size == (256, 256)
    assert "dB" in metrics and status.startswith("**Done**")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (("/nonexistent/diffq-model", "w4a8", "a cat", 0, 2), "could not load"),
        (("{folder}", "w9a9", "a cat", 0, 2), "Unknown preset"),
        (("{folder}", "w4a8", "", 0, 2), "prompt is empty"),
        (("{folder}", "w4a8", "a cat", -3, 2), "seed must be between"),
        (("{folder}", "w4a8", "a cat", 0, 1000), "between 1 and 100"),
    ],
)
def test_handle_generate_errors_are_messages(models, tiny_folder, inputs, message):
    inputs = tuple(x.format(folder=tiny_folder) if isinstance(x, str) else x for x in inputs)
    full, quantized, metrics, status = app.handle_generate(models, *inputs)
    assert full is None and quantized is None and metrics == ""
    assert status.startswith("**Error:**") and message in status.replace("\\", "")
    assert "Traceback" not in status


def test_unexpected_errors_are_messages_and_the_app_keeps_serving(models, tiny_folder, comparison, monkeypatch):
    def boom(*_args, **_kwargs):
        raise RuntimeError("kernel exploded")

    with monkeypatch.context() as patch:
        patch.setattr(models, "generate", boom)
        status = app.handle_generate(models, tiny_folder, "w4a8", "a cat", 0, 2)[3]
    assert "something went wrong" in status and "kernel exploded" in status and "Traceback" not in status
    assert app.handle_generate(models, tiny_folder, "w4a8", "a red cat", 3, 3)[3].startswith("**Done**")


def test_temporal_layers_quantized_weight_only_and_cached_apart(models, tiny_folder, comparison):
    full, quantized, metrics, status = app.handle_generate(models, tiny_folder, "w4a8", "a red cat", 3, 3, temporal="8")
    assert "temporal layers 8-bit" in status and quantized is not None
    q_pipe, _preset, cached = models.quantized(tiny_folder, "w4a8", temporal_bits=8)
    assert cached and q_pipe is not models.quantized(tiny_folder, "w4a8")[0]
    temporal = {n: c for n, c in plan_of(denoiser_of(q_pipe)).layers.items() if n.endswith("time_emb_proj")}
    assert temporal and all(c.w_bits == 8 and c.a_bits is None for c in temporal.values())
    plain = plan_of(denoiser_of(models.quantized(tiny_folder, "w4a8")[0]))
    assert not any(n.endswith("time_emb_proj") for n in plain.layers)
    table = app.handle_plan(models, tiny_folder, "w4a8", temporal="8")[2]
    assert "time_emb_proj" in table
    assert app.handle_generate(models, tiny_folder, "w4a8", "a cat", 0, 2, temporal="3")[3].startswith("**Error:**")


def test_handle_plan(models, tiny_folder, comparison):
    bits, ranges, table, status = app.handle_plan(models, tiny_folder, "w4a8")
    assert bits.width > 100 and ranges.width > 100 and "int4" in table and "layers quantized" in status
    assert app.handle_plan(models, "", "w4a8")[3].startswith("**Error:** Choose a model")


# -- the page and the command line ------------------------------------------------------------------------------


def _component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_build_app_prefills_the_model(monkeypatch, tiny_folder):
    import gradio as gr

    monkeypatch.setenv(app.MODEL_ENV, tiny_folder)
    demo = app.build_app(models=tiny_models())
    assert isinstance(demo, gr.Blocks)
    assert _component(demo, "model").value == tiny_folder
    assert _component(demo, "preset").value == "w4a8"
    assert _component(demo, "temporal").value == "16"  # the temporal layers stay 16-bit by default
    assert _component(demo, "steps").maximum == app.MAX_STEPS
    assert _component(app.build_app("digits-dit", tiny_models()), "model").value == "digits-dit"


def test_main_parses_and_launches(monkeypatch):
    launched = {}
    monkeypatch.setattr(app, "build_app", lambda model=None: f"demo:{model}")
    monkeypatch.setattr(app, "launch", lambda demo, host, port, share: launched.update(
        demo=demo, host=host, port=port, share=share))
    app.main(["--host", "0.0.0.0", "--port", "7999", "--share", "--model", "digits-dit"])
    assert launched == {"demo": "demo:digits-dit", "host": "0.0.0.0", "port": 7999, "share": True}
    app.main([])
    assert launched == {"demo": "demo:None", "host": "127.0.0.1", "port": 7860, "share": False}


def test_main_threads(monkeypatch):
    import torch

    monkeypatch.setattr(app, "build_app", lambda model=None: None)
    monkeypatch.setattr(app, "launch", lambda *args: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls: list[int] = []
    app.main(["--threads", "3"])
    assert calls == [3]
    with pytest.raises(SystemExit):
        app.main(["--threads", "0"])
