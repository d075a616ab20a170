"""Bundled reference models: data split, prompts, classifier and the two digits pipelines (no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffq.pipelines.reference import (
    BUNDLED_MODELS,
    DEFAULT_CALL_KWARGS,
    WEIGHTS_DIR,
    bundled_path,
    eval_prompts,
    load_classifier,
)
from diffq.pipelines.reference.data import (
    PROMPT_TEMPLATES,
    load_split,
    prompt_for,
    random_affine,
    split_indices,
)


def test_split_is_disjoint_and_complete():
    splits = split_indices()
    sets = {k: set(v.tolist()) for k, v in splits.items()}
    assert sum(len(s) for s in sets.values()) == 1797
    assert set.union(*sets.values()) == set(range(1797))
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    # the diffusion models get the larger share; every digit occurs in every split
    assert len(sets["diffusion"]) > len(sets["classifier_train"]) > len(sets["classifier_test"])
    for name in names:
        _, labels = load_split(name)
        assert set(labels.tolist()) == set(range(10))


def test_load_split_shape_and_range():
    x, y = load_split("classifier_test")
    assert x.shape == (len(y), 1, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    moved = random_affine(x[:8], torch.Generator().manual_seed(0))
    assert moved.shape == x[:8].shape and 0.0 <= float(moved.min()) <= float(moved.max()) <= 1.0


def test_prompts_are_deterministic_and_cycle_digits():
    assert prompt_for(7, 0) == "a handwritten digit 7"
    assert prompt_for(7, 4) == "seven"
    assert prompt_for(3, len(PROMPT_TEMPLATES)) == prompt_for(3, 0)
    pairs = eval_prompts(64)
    assert pairs == eval_prompts(64) and len(pairs) == 64
    assert [d for _, d in pairs] == [i % 10 for i in range(64)]
    assert len({p for p, _ in pairs}) == 64
    with pytest.raises(ValueError):
        prompt_for(10)


def test_classifier_held_out_accuracy():
    model = load_classifier()
    assert not model.training
    x, y = load_split("classifier_test")
    acc = float((model.predict(x) == y).float().mean())
    assert acc >= 0.95, acc


def test_classifier_accepts_rgb_and_other_sizes():
    model = load_classifier()
    x, y = load_split("classifier_test", size=8)
    rgb = x[:16].expand(-1, 3, -1, -1)
    with torch.no_grad():
        logits = model(rgb)
        feats = model.features(torch.nn.functional.interpolate(x[:16], size=64))
    assert logits.shape == (16, 10)
    assert feats.ndim == 2 and feats.shape[0] == 16 and torch.isfinite(feats).all()
    assert float((logits.argmax(1) == y[:16]).float().mean()) >= 0.8


def test_bundled_paths():
    assert set(BUNDLED_MODELS) == {"digits-sd", "digits-dit"}
    for name in BUNDLED_MODELS:
        assert bundled_path(name) == WEIGHTS_DIR / name
    assert bundled_path("no-such-model") is None


def test_bundled_weights_are_small():
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert total <= 20 * 1024 * 1024, total


def _tiny_call(pipe, name: str) -> np.ndarray:
    kwargs = {**DEFAULT_CALL_KWARGS[name], "num_inference_steps": 2}
    out = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return out.images


def test_digits_sd_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(bundled_path("digits-sd"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    images = _tiny_call(pipe, "digits-sd")
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


def test_digits_dit_loads_with_plain_diffusers_and_generates():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(bundled_path("digits-dit"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    images = _tiny_call(pipe, "digits-dit")
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()
