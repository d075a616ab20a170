"""Bad input at every door: each public entry point, each CLI verb and the demo (over HTTP) answer
malformed arguments with a DiffQError that says what was wrong, before any long work, and the demo
keeps serving after each bad request."""

from __future__ import annotations

import json
import math
import os
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_app import load_app

import diffq
from diffq.cli import main as cli_main
from diffq.errors import (
    CheckpointError,
    DiffQError,
    ModelLoadError,
    QuantizationInputError,
    UnknownPresetError,
    UnsupportedTargetError,
)
from diffq.pipelines.testing import TINY_PROMPTS, tiny_call_kwargs, tiny_pixart_pipeline, tiny_sd_pipeline
from diffq.saving import OverwriteRefusedError
from diffq.sensitivity import Candidate


@pytest.fixture(scope="module")
def ctx():
    """A tiny SD pipeline with its statistics and a w8a8 plan (built once), and a pipeline maker."""
    pipe = tiny_sd_pipeline()
    call = tiny_call_kwargs(pipe)
    stats = diffq.calibrate(pipe, TINY_PROMPTS[:1], num_inference_steps=2, progress=False, **call)
    plan = diffq.allocate(pipe, stats, preset="w8a8", progress=False)
    return SimpleNamespace(pipe=pipe, call=call, stats=stats, plan=plan, fresh=tiny_sd_pipeline)


def _linear() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8))


def _nan_weights() -> torch.nn.Module:
    module = _linear()
    with torch.no_grad():
        module[0].weight[0, 0] = math.nan
    return module


def _q(c, preset="w8a8-rtn", **kwargs):
    return diffq.quantize(c.fresh(), preset, progress=False, **kwargs)


# (entry point and argument, call, error class, words the message must contain)
API_CASES = [
    ("quantize preset=123", lambda c: _q(c, 123), UnknownPresetError, "valid presets"),
    ("quantize preset unknown", lambda c: _q(c, "w4b8"), UnknownPresetError, "valid presets"),
    ("quantize preset empty", lambda c: _q(c, ""), UnknownPresetError, "valid presets"),
    ("quantize steps=0", lambda c: _q(c, "w8a8", num_calibration_steps=0), QuantizationInputError, "at least 1"),
    ("quantize steps=2.5", lambda c: _q(c, "w8a8", num_calibration_steps=2.5), QuantizationInputError, "whole number"),
    ("quantize steps='8'", lambda c: _q(c, "w8a8", num_calibration_steps="8"), QuantizationInputError, "whole number"),
    ("quantize calibration=[]", lambda c: _q(c, "w8a8", calibration=[]), QuantizationInputError, "non-empty"),
    ("quantize calibration=str", lambda c: _q(c, "w8a8", calibration="a cat"), QuantizationInputError, "non-empty"),
    ("quantize calibration=[1, 2]", lambda c: _q(c, "w8a8", calibration=[1, 2]), QuantizationInputError, "strings"),
    ("quantize rank=-1", lambda c: _q(c, "w4a4-rtn", rank=-1), QuantizationInputError, "rank"),
    ("quantize rank=True", lambda c: _q(c, "w4a4-rtn", rank=True), QuantizationInputError, "whole number"),
    ("quantize budget=nan", lambda c: _q(c, "mixed", budget=math.nan), QuantizationInputError, "finite"),
    ("quantize budget=inf", lambda c: _q(c, "mixed", budget=math.inf), QuantizationInputError, "finite"),
    ("quantize budget='4'", lambda c: _q(c, "mixed", budget="4"), QuantizationInputError, "finite"),
    ("quantize budget=-1", lambda c: _q(c, "mixed", budget=-1), QuantizationInputError, "at least 0"),
    ("quantize budget, uniform preset", lambda c: _q(c, budget=4), QuantizationInputError, "uniform"),
    ("quantize activations=x", lambda c: _q(c, activations="x"), QuantizationInputError, "dynamic"),
    ("quantize components unknown", lambda c: _q(c, components=["nope"]), QuantizationInputError, "components"),
    ("quantize components=[]", lambda c: _q(c, components=[]), QuantizationInputError, "denoiser"),
    ("quantize temporal_bits=3", lambda c: _q(c, temporal_bits=3), QuantizationInputError, "temporal_bits"),
    ("quantize metric unknown", lambda c: _q(c, sensitivity_metric="foo"), QuantizationInputError, "decoupled"),
    ("quantize load_kwargs=5", lambda c: diffq.quantize("digits-sd", "w8a8-rtn", load_kwargs=5),
     QuantizationInputError, "load_kwargs"),
    ("quantize target=42", lambda c: diffq.quantize(42, "w8a8"), UnsupportedTargetError, "pipeline"),
    ("quantize target=None", lambda c: diffq.quantize(None, "w8a8"), UnsupportedTargetError, "pipeline"),
    ("quantize unknown model", lambda c: diffq.quantize("no-such-user/no-such-model", "w8a8"), ModelLoadError, "offline"),
    ("quantize empty module", lambda c: diffq.quantize(torch.nn.Sequential(), "w8a8-rtn"), UnsupportedTargetError,
     "no Linear"),
    ("quantize module, calibrated, no inputs", lambda c: diffq.quantize(_linear(), "w8a8"), QuantizationInputError,
     "calibration=[{"),
    ("quantize NaN calibration inputs", lambda c: diffq.quantize(
        _linear(), "w8a8", calibration=[{"input": torch.full((2, 8), math.nan)}], progress=False),
     QuantizationInputError, "NaN"),
    ("quantize inf calibration inputs", lambda c: diffq.quantize(
        _linear(), "w8a8", calibration=[{"input": torch.full((2, 8), math.inf)}], progress=False),
     QuantizationInputError, "NaN or inf"),
    ("quantize NaN weights", lambda c: diffq.quantize(_nan_weights(), "w8a16-rtn", progress=False),
     QuantizationInputError, "NaN"),
    ("calibrate prompts=[]", lambda c: diffq.calibrate(c.fresh(), [], progress=False), QuantizationInputError,
     "non-empty"),
    ("calibrate prompts=str", lambda c: diffq.calibrate(c.fresh(), "a cat", progress=False), QuantizationInputError,
     "non-empty"),
    ("calibrate steps=0", lambda c: diffq.calibrate(c.fresh(), ["a"], 0), QuantizationInputError, "at least 1"),
    ("calibrate steps=-3", lambda c: diffq.calibrate(c.fresh(), ["a"], -3), QuantizationInputError, "at least 1"),
    ("calibrate guidance=nan", lambda c: diffq.calibrate(c.fresh(), ["a"], 2, math.nan), QuantizationInputError,
     "finite"),
    ("calibrate pipe=42", lambda c: diffq.calibrate(42, ["a"]), UnsupportedTargetError, "denoiser"),
    ("calibrate a bare module", lambda c: diffq.calibrate(torch.nn.Linear(2, 2), ["a"]), UnsupportedTargetError,
     "denoiser"),
    ("allocate preset unknown", lambda c: diffq.allocate(c.pipe, c.stats, preset="bogus"), UnknownPresetError,
     "valid presets"),
    ("allocate budget=nan", lambda c: diffq.allocate(c.pipe, c.stats, preset="mixed", budget=math.nan),
     QuantizationInputError, "finite"),
    ("allocate content_share=1.5", lambda c: diffq.allocate(c.pipe, c.stats, preset="mixed", content_share=1.5),
     QuantizationInputError, "between 0 and 1"),
    ("allocate calibrated preset, no stats", lambda c: diffq.allocate(c.pipe, None, preset="w8a8"),
     QuantizationInputError, "calibrat"),
    ("allocate stats of the wrong type", lambda c: diffq.allocate(c.pipe, {}, preset="w8a8"), QuantizationInputError,
     "CalibrationStats"),
    ("allocate unknown layer setting", lambda c: diffq.allocate(c.pipe, c.stats, preset="w8a8", bogus=1),
     QuantizationInputError, "LayerConfig"),
    ("allocate missing sensitivity file", lambda c: diffq.allocate(c.pipe, c.stats, preset="w3.5a8",
                                                                   sensitivity="/nonexistent/sens.json"),
     CheckpointError, "no sensitivity file"),
    ("convert plan=dict", lambda c: diffq.convert(c.fresh(), {"layers": {}}), QuantizationInputError, "QuantPlan"),
    ("convert plan=None", lambda c: diffq.convert(c.fresh(), None), QuantizationInputError, "QuantPlan"),
    ("convert stats=list", lambda c: diffq.convert(c.fresh(), c.plan, []), QuantizationInputError, "CalibrationStats"),
    ("convert a plan of another model", lambda c: diffq.convert(tiny_pixart_pipeline(), c.plan, c.stats),
     QuantizationInputError, "another model"),
    ("convert a plan onto a bare module", lambda c: diffq.convert(_linear(), c.plan, c.stats),
     QuantizationInputError, "another model"),
    ("convert static plan without stats", lambda c: diffq.convert(c.fresh(), c.plan, None), QuantizationInputError,
     "needs calibration statistics"),
    ("convert target=42", lambda c: diffq.convert(42, c.plan), UnsupportedTargetError, "nn.Module"),
    ("sensitivity candidates=[]", lambda c: diffq.sensitivity(c.fresh(), c.stats, [], ["a"], cache=None),
     QuantizationInputError, "non-empty list"),
    ("sensitivity candidate label bad", lambda c: diffq.sensitivity(c.fresh(), c.stats, ["w9a8"], ["a"], cache=None),
     QuantizationInputError, "weights take"),
    ("sensitivity candidates=42", lambda c: diffq.sensitivity(c.fresh(), c.stats, [42], ["a"], cache=None),
     QuantizationInputError, "Candidate"),
    ("sensitivity prompts=[]", lambda c: diffq.sensitivity(c.fresh(), c.stats, None, [], cache=None),
     QuantizationInputError, "at least one prompt"),
    ("sensitivity steps=0", lambda c: diffq.sensitivity(c.fresh(), c.stats, None, ["a"], num_inference_steps=0,
                                                        cache=None), QuantizationInputError, "at least 1"),
    ("sensitivity shard=(2, 1)", lambda c: diffq.sensitivity(c.fresh(), c.stats, None, ["a"], shard=(2, 1),
                                                             cache=None, progress=False, **c.call),
     QuantizationInputError, "shard"),
    ("sensitivity metric unknown", lambda c: diffq.sensitivity(c.fresh(), c.stats, metric="x", cache=None),
     QuantizationInputError, "decoupled"),
    ("sensitivity of a bare module", lambda c: diffq.sensitivity(torch.nn.Linear(2, 2), None, cache=None),
     UnsupportedTargetError, "denoiser"),
    ("Candidate.parse bits", lambda c: Candidate.parse("w9a8"), QuantizationInputError, "weights take"),
    ("Candidate.parse syntax", lambda c: Candidate.parse("4a8"), QuantizationInputError, "e.g. 'w4a8'"),
    ("load unknown model", lambda c: diffq.load("no-such-user/no-such-model"), ModelLoadError, "offline"),
    ("load 42", lambda c: diffq.load(42), QuantizationInputError, "path or name"),
    ("load None", lambda c: diffq.load(None), QuantizationInputError, "path or name"),
    ("load ''", lambda c: diffq.load(""), QuantizationInputError, "path or name"),
    ("load a file", lambda c: diffq.load(__file__), ModelLoadError, "is a file"),
    ("save pipe=42", lambda c: diffq.save(42, "/nonexistent/out"), UnsupportedTargetError, "writes a pipeline"),
    ("save directory=None", lambda c: diffq.save(c.pipe, None), QuantizationInputError, "path"),
    ("save into a file", lambda c: diffq.save(c.pipe, __file__), OverwriteRefusedError, "existing file"),
    ("CalibrationStats.load missing", lambda c: diffq.CalibrationStats.load("/nonexistent/stats"), CheckpointError,
     "missing"),
    ("QuantPlan.from_json garbage", lambda c: diffq.QuantPlan.from_json("{"), CheckpointError, "unreadable"),
    ("QuantPlan of a newer format", lambda c: diffq.QuantPlan.from_dict({**c.plan.to_dict(), "format_version": 99}),
     CheckpointError, "newer"),
]


@pytest.mark.parametrize(("case", "call", "error", "words"), API_CASES, ids=[c[0] for c in API_CASES])
def test_the_api_rejects_bad_input_with_a_clear_error(ctx, case, call, error, words):
    with pytest.raises(error) as caught:
        call(ctx)
    assert words in str(caught.value), f"{case}: {caught.value}"


def _saved_quantized(tmp_path: Path) -> Path:
    folder = tmp_path / "quantized"
    diffq.save(diffq.quantize(tiny_sd_pipeline(), "w8a8-rtn", progress=False), folder)
    return folder


def _edit_plan(folder: Path, edit) -> None:
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    edit(config["quantization_config"]["plan"])
    config_path.write_text(json.dumps(config))


def test_a_checkpoint_of_a_newer_format_version_is_refused(tmp_path):
    folder = _saved_quantized(tmp_path)
    _edit_plan(folder, lambda plan: plan.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer than this diffq"):
        diffq.load(folder)


def test_a_checkpoint_whose_plan_does_not_match_its_model_is_refused(tmp_path):
    folder = _saved_quantized(tmp_path)
    _edit_plan(folder, lambda plan: plan["layers"].update(not_a_layer=next(iter(plan["layers"].values()))))
    with pytest.raises(DiffQError, match="another model|does not match|not have"):
        diffq.load(folder)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    folder = _saved_quantized(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        diffq.load(folder)


# (argv, exit status, words in stderr); 2 is argparse's usage error, 1 a DiffQError
CLI_CASES = [
    (["quantize", "digits-sd", "--preset", "bogus", "--out", "{tmp}/q"], 1, "unknown preset"),
    (["quantize", "digits-sd", "--calibration-steps", "0", "--out", "{tmp}/q"], 2, "below 1"),
    (["quantize", "digits-sd", "--calibration-steps", "x", "--out", "{tmp}/q"], 2, "not a whole number"),
    (["quantize", "no-such-user/no-such-model", "--out", "{tmp}/q"], 1, "could not load"),
    (["quantize", "digits-sd", "--preset", "w8a8-rtn", "--prompts", "{tmp}/missing.txt", "--out", "{tmp}/q"], 1,
     "cannot read the prompts file"),
    (["quantize", "digits-sd", "--preset", "w8a8-rtn", "--prompts", "{tmp}/empty.txt", "--out", "{tmp}/q"], 1,
     "holds no prompts"),
    (["quantize", "digits-sd", "--preset", "w8a8-rtn", "--out", "{tmp}/file.txt"], 1, "existing file"),
    (["generate", "digits-sd", "--prompt", "  ", "--out", "{tmp}/a.png"], 1, "--prompt is empty"),
    (["generate", "digits-sd", "--prompt", "a 7", "--steps", "0", "--out", "{tmp}/a.png"], 2, "below 1"),
    (["generate", "digits-sd", "--prompt", "a 7", "--steps", "-2", "--out", "{tmp}/a.png"], 2, "below 1"),
    (["generate", "digits-sd", "--prompt", "a 7", "--height", "0", "--out", "{tmp}/a.png"], 2, "below 1"),
    (["generate", "digits-sd", "--prompt", "a 7", "--guidance-scale", "nan", "--out", "{tmp}/a.png"], 2, "finite"),
    (["generate", "digits-sd", "--prompt", "a 7", "--seed", "-1", "--out", "{tmp}/a.png"], 2, "below 0"),
    (["generate", "digits-sd", "--prompt", "a 7", "--out", "{tmp}/a.xyz"], 1, "not an image format"),
    (["generate", "digits-sd", "--prompt", "a 7", "--out", "{tmp}/taken.png"], 1, "existing file"),
    (["generate", "digits-sd", "--prompt", "a 7", "--preset", "bogus", "--out", "{tmp}/a.png"], 1, "unknown preset"),
    (["eval", "digits-sd", "--num-images", "0", "--out", "{tmp}/e"], 1, "positive integer"),
    (["eval", "digits-sd", "--presets", "", "--out", "{tmp}/e"], 1, "no presets given"),
    (["eval", "digits-sd", "--presets", "fp,bogus", "--out", "{tmp}/e"], 1, "unknown preset"),
    (["eval", "digits-sd", "--presets", "w4a4:rank=x", "--out", "{tmp}/e"], 1, "bad value"),
    (["eval", "digits-sd", "--batch-size", "0", "--out", "{tmp}/e"], 1, "positive integer"),
    (["eval", "digits-sd", "--num-images", "2", "--out", "{tmp}"], 1, "did not write"),
    (["calibrate", "digits-sd"], 1, "say what to write"),
    (["calibrate", "digits-sd", "--out", "{tmp}/s", "--steps", "0"], 2, "below 1"),
    (["calibrate", "digits-sd", "--out", "{tmp}/file.txt"], 1, "existing file"),
    (["sensitivity", "digits-sd", "--out", "{tmp}/sens.json", "--candidates", "w9a8"], 1, "weights take"),
    (["sensitivity", "digits-sd", "--out", "{tmp}/file.txt"], 1, "existing file"),
    (["allocate", "digits-sd", "--budget", "nan"], 2, "finite"),
    (["allocate", "digits-sd", "--preset", "w8a8"], 1, "is uniform"),
    (["allocate", "digits-sd", "--out", "{tmp}/file.txt"], 1, "existing file"),
    (["allocate", "digits-sd", "--sensitivity", "{tmp}/missing.json", "--steps", "1"], 1, "no sensitivity file"),
    (["demo", "--port", "0"], 2, "below 1"),
]


@pytest.mark.parametrize(("argv", "status", "words"), CLI_CASES, ids=[" ".join(c[0][:4]) for c in CLI_CASES])
def test_every_cli_verb_rejects_bad_input_without_a_traceback(tmp_path, capsys, argv, status, words):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "file.txt").write_text("mine")
    Image.new("RGB", (4, 4)).save(tmp_path / "taken.png")  # a user's image, not one diffq drew
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = cli_main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == status and words in err and "Traceback" not in err, err
    assert (tmp_path / "file.txt").read_text() == "mine"


# -- the demo over HTTP --------------------------------------------------------------------------------------


def _call(url: str, api: str, data: list) -> tuple[str, object]:
    """Call the demo's Gradio HTTP API: ``(event, data)`` of the finished call (``complete`` or ``error``)."""
    request = urllib.request.Request(f"{url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    event, payload = None, None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event_id}", timeout=300) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                text = line.split(":", 1)[1].strip()
                payload = json.loads(text) if text and text != "null" else None
                break
    return event, payload


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = load_app()
    folder = tmp_path_factory.mktemp("demo-http") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    models = app.DemoModels(call_kwargs={"height": 32, "width": 32}, calibration_prompts=["a red cat"],
                            calibration_steps=2, progress_bars=False)
    demo = app.build_app(model=str(folder), models=models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", str(folder)
    finally:
        demo.close()


# (model, preset, prompt, seed, steps, temporal) -> who refuses it and the words of its message. diffq's
# handler answers with an error status; values outside a component's choices or range Gradio refuses
# itself, before the handler runs (an "error" event; None where Gradio only logs it). "{folder}": the tiny model.
DEMO_CASES = [
    (("/nonexistent/diffq-model", "w8a8-rtn", "a cat", 0, 2, "16"), "diffq", "could not load"),
    (("", "w8a8-rtn", "a cat", 0, 2, "16"), "diffq", "Choose a model"),
    (("{folder}/unet", "w8a8-rtn", "a cat", 0, 2, "16"), "diffq", "model_index.json"),  # a model of another kind
    (("{folder}", "w8a8-rtn", "", 0, 2, "16"), "diffq", "prompt is empty"),
    (("{folder}", "w8a8-rtn", None, 0, 2, "16"), "diffq", "prompt is empty"),
    (("{folder}", "w8a8-rtn", "a cat", -3, 2, "16"), "diffq", "seed must be between"),
    (("{folder}", "w9a9", "a cat", 0, 2, "16"), "gradio", "not in the list of choices"),
    (("{folder}", 42, "a cat", 0, 2, "16"), "gradio", "not in the list of choices"),
    (("{folder}", "w8a8-rtn", "a cat", "abc", 2, "16"), "gradio", None),
    (("{folder}", "w8a8-rtn", "a cat", 0, 1000, "16"), "gradio", "greater than maximum"),
    (("{folder}", "w8a8-rtn", "a cat", 0, 0, "16"), "gradio", "less than minimum"),
    (("{folder}", "w8a8-rtn", "a cat", 0, "many", "16"), "gradio", None),
    (("{folder}", "w8a8-rtn", "a cat", 0, 2, "7"), "gradio", "not in the list of choices"),
]


def test_the_demo_answers_bad_requests_over_http_and_keeps_serving(demo_url):
    url, folder = demo_url
    for inputs, who, words in DEMO_CASES:
        inputs = [x.format(folder=folder) if isinstance(x, str) else x for x in inputs]
        event, data = _call(url, "generate", inputs)
        if who == "diffq":
            assert event == "complete", (inputs, event, data)
            full, quantized, metrics, status = data
            assert full is None and quantized is None and status.startswith("**Error:**"), (inputs, status)
            assert words in status.replace("\\", "") and "Traceback" not in status, (inputs, status)
        else:
            assert event == "error" and (words is None or words in str(data)), (inputs, event, data)
    event, _ = _call(url, "generate", [folder])  # too few inputs: Gradio's own error
    assert event == "error"
    event, data = _call(url, "plan", ["/nonexistent/diffq-model", "w8a8-rtn", "16"])
    assert event == "complete" and "could not load" in data[3]
    event, data = _call(url, "generate", [folder, "w8a8-rtn", "a red cat", 1, 2, "16"])  # still serving
    assert event == "complete" and data[3].startswith("**Done**") and data[1] is not None, data
