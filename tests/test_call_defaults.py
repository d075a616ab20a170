"""The bundled pipelines answer plain diffusers calls, and their call defaults live in one place."""

import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline

import app
import diffq
from diffq.cli import _call_kwargs, build_parser
from diffq.metrics.evaluate import default_call_kwargs as eval_defaults
from diffq.pipelines.calibrate import default_call_kwargs as calibration_defaults
from diffq.pipelines.call_defaults import FILE, bundled_name, call_defaults
from diffq.pipelines.reference import BUNDLED_MODELS, DEFAULT_CALL_KWARGS

BUNDLED = sorted(DEFAULT_CALL_KWARGS)


def image_of(pipe, *args, **kwargs):
    import torch

    return np.asarray(pipe(*args, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0])


@pytest.mark.parametrize("name", BUNDLED)
def test_every_entry_point_reads_the_same_defaults(name, tmp_path):
    expected = DEFAULT_CALL_KWARGS[name]
    assert call_defaults(name) == expected == call_defaults(BUNDLED_MODELS[name])
    assert eval_defaults(name) == expected
    assert app.default_call_kwargs(name) == expected
    args = build_parser().parse_args(["generate", name, "--prompt", "a handwritten digit 1"])
    assert _call_kwargs(name, args) == expected
    pipe = diffq.load(name)
    without_steps = {k: v for k, v in expected.items() if k != "num_inference_steps"}
    assert calibration_defaults(pipe) == without_steps
    assert bundled_name(pipe) == name
    link = tmp_path / "link"
    link.symlink_to(BUNDLED_MODELS[name])
    assert call_defaults(link) == expected
    assert call_defaults("someone/some-model") == {} and call_defaults(tmp_path) == {}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_pipelines_answer_plain_calls_float_quantized_saved_and_reloaded(name, tmp_path):
    float_pipe = diffq.load(name)
    explicit = image_of(float_pipe, "a handwritten digit 7", **DEFAULT_CALL_KWARGS[name])
    plain = image_of(float_pipe, "a handwritten digit 7")  # no diffq-only keyword
    assert plain.shape == (32, 32, 3) and np.array_equal(plain, explicit)
    assert image_of(float_pipe, "a handwritten digit 7", num_inference_steps=3).shape == (32, 32, 3)

    quantized = diffq.quantize(name, "w8a16-rtn", progress=False)
    plain_q = image_of(quantized, "a handwritten digit 7", num_inference_steps=4)
    folder = tmp_path / "q"
    quantized.save_pretrained(folder)
    assert json.loads((folder / FILE).read_text()) == DEFAULT_CALL_KWARGS[name]
    for reloaded in (diffq.load(folder), diffq.load(str(folder))):
        assert np.array_equal(image_of(reloaded, "a handwritten digit 7", num_inference_steps=4), plain_q)
    assert call_defaults(folder) == DEFAULT_CALL_KWARGS[name]


def test_a_callers_arguments_win_over_the_defaults():
    pipe = diffq.load("digits-dit")
    assert image_of(pipe, "a handwritten digit 2", num_inference_steps=2, height=64, width=64).shape == (64, 64, 3)
    import inspect

    assert "use_resolution_binning" in inspect.signature(pipe.__call__).parameters  # the pipeline's own signature
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and isinstance(pipe, DiffusionPipeline)


def test_plain_diffusers_loading_of_the_bundled_dit_still_needs_the_keyword():
    """What diffq cannot change: PixArt's resolution binning knows only 256-1024 px models, and a
    folder can only bring its own pipeline class with ``trust_remote_code=True``. diffusers' own
    ``from_pretrained`` of the 32 px folder therefore needs ``use_resolution_binning=False``."""
    pipe = DiffusionPipeline.from_pretrained(BUNDLED_MODELS["digits-dit"])
    with pytest.raises(ValueError, match="Invalid sample size"):
        pipe("a handwritten digit 7", num_inference_steps=1)
    assert image_of(pipe, "a handwritten digit 7", num_inference_steps=2, use_resolution_binning=False).shape == (32, 32, 3)
    sd = DiffusionPipeline.from_pretrained(BUNDLED_MODELS["digits-sd"])
    assert image_of(sd, "a handwritten digit 7", num_inference_steps=2).shape == (32, 32, 3)
