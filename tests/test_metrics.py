"""diffq.metrics: FID, CLIP score, alignment, fidelity, prompts, reports (synthetic tensors, no pipelines)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffq.metrics.fid as fid_mod
from diffq.errors import DiffQError
from diffq.metrics.clip_score import alignment, predict_digits, resolve_clip_weights
from diffq.metrics.errors import EvaluationInputError, MissingWeightsError
from diffq.metrics.fidelity import PSNR_CAP_DB, lpips, lpips_weights_available, psnr, ssim
from diffq.metrics.generation import shard_batches
from diffq.metrics.images import as_image_batch, to_rgb
from diffq.metrics.prompts import read_prompts_file, resolve_prompts
from diffq.metrics.report import atomic_write_text, make_grid, render_markdown, write_report


class PixelClassifier(nn.Module):
    """A stand-in digit classifier: 4×4 average-pooled gray pixels as features, a fixed linear head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(10, 16, generator=gen))
            self.head.bias.zero_()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 4).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    """A torch hub folder with nothing in it, and no Inception path in the environment."""
    monkeypatch.delenv(fid_mod.INCEPTION_WEIGHTS_ENV, raising=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


# --- images ------------------------------------------------------------------------------------------------


def test_as_image_batch_reads_every_pipeline_output_layout():
    from PIL import Image

    nchw = torch.rand(2, 3, 8, 8)
    nhwc = nchw.permute(0, 2, 3, 1).numpy()
    assert torch.allclose(as_image_batch(nchw), nchw)
    assert torch.allclose(as_image_batch(nhwc), nchw)
    u8 = (nhwc * 255).round().astype(np.uint8)
    pil = [Image.fromarray(u8[i]) for i in range(2)]
    assert torch.allclose(as_image_batch(pil), torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    assert as_image_batch(torch.rand(1, 8, 8)).shape == (1, 1, 8, 8)
    assert to_rgb(torch.rand(2, 1, 4, 4)).shape == (2, 3, 4, 4)


# --- fidelity ----------------------------------------------------------------------------------------------


def test_psnr_known_value_and_cap():
    a = torch.zeros(3, 1, 16, 16)
    b = torch.full_like(a, 0.1)  # MSE 0.01 -> 20 dB
    assert psnr(b, a) == pytest.approx(20.0, abs=1e-5)
    assert psnr(a, a) == PSNR_CAP_DB


def test_psnr_is_mean_over_images():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.stack([torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), 0.01)])  # 20 dB and 40 dB
    assert psnr(b, a) == pytest.approx(30.0, abs=1e-5)


def test_ssim_identity_noise_and_small_images():
    torch.manual_seed(0)
    a = torch.rand(4, 3, 32, 32)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(noisy, a) < 0.95
    tiny = torch.rand(2, 1, 8, 8)  # smaller than the 11-pixel window
    assert ssim(tiny, tiny) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        ssim(a, a[:2])


def test_ssim_in_batches_equals_one_pass():
    from torchmetrics.functional.image import structural_similarity_index_measure

    torch.manual_seed(0)
    a, b = torch.rand(10, 3, 32, 32), torch.rand(10, 3, 32, 32)
    whole = float(structural_similarity_index_measure(a.double(), b.double(), data_range=1.0))
    assert ssim(a, b, batch_size=3) == pytest.approx(whole, rel=1e-12)
    assert ssim(a, b) == pytest.approx(whole, rel=1e-12)


def test_lpips_is_none_without_local_weights(no_local_weights):
    assert lpips_weights_available("alex") is False
    a = torch.rand(2, 3, 16, 16)
    assert lpips(a, a) is None
    with pytest.raises(ValueError):
        lpips_weights_available("resnet")


# --- FID ---------------------------------------------------------------------------------------------------


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_reference_formula_on_classifier_features():
    torch.manual_seed(0)
    clf = PixelClassifier()
    real = torch.rand(64, 1, 16, 16)
    fake = (torch.rand(48, 3, 16, 16) * 0.7 + 0.2).clamp(0, 1)
    feature = fid_mod.ClassifierFeatures(clf)
    assert feature.num_features == 16
    got = fid_mod.FID(feature, real)(fake)
    want = _reference_fid(clf.features(real).double().numpy(), clf.features(fake).double().numpy())
    assert got == pytest.approx(want, rel=1e-3)


def test_fid_reuses_real_features_and_orders_distributions():
    torch.manual_seed(0)
    real = torch.rand(64, 1, 16, 16)
    fid = fid_mod.FID(fid_mod.ClassifierFeatures(PixelClassifier()), real, batch_size=16)
    same = fid(torch.rand(64, 1, 16, 16))
    shifted = fid(torch.rand(64, 1, 16, 16) * 0.5)
    assert 0 <= same < shifted
    assert fid(torch.rand(64, 1, 16, 16) * 0.5) == pytest.approx(
        shifted, rel=0.5
    )  # real set kept across calls
    assert fid(real[:1]) is None  # FID needs two images


def test_fid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(1)
    feature = fid_mod.ClassifierFeatures(PixelClassifier())
    real, fake = torch.rand(40, 1, 16, 16), (torch.rand(30, 1, 16, 16) * 0.6).clamp(0, 1)
    metric = FrechetInceptionDistance(feature=feature, normalize=True, sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_mod.FID(feature, real)(fake) == pytest.approx(float(metric.compute()), rel=1e-6, abs=1e-9)


def test_fid_bootstrap_is_reproducible_and_resamples_the_generated_set():
    torch.manual_seed(2)
    fid = fid_mod.FID(fid_mod.ClassifierFeatures(PixelClassifier()), torch.rand(48, 1, 16, 16))
    features = fid.features(torch.rand(32, 1, 16, 16))
    indices = fid_mod.bootstrap_indices(32, 20, seed=3)
    assert indices.shape == (20, 32) and torch.equal(indices, fid_mod.bootstrap_indices(32, 20, seed=3))
    assert not torch.equal(indices, fid_mod.bootstrap_indices(32, 20, seed=4))
    identity = torch.arange(32).repeat(3, 1)  # "resamples" that are the set itself give its FID
    assert fid.bootstrap(features, identity).tolist() == pytest.approx([fid.distance(features)] * 3)
    replicates = fid.bootstrap(features, indices)
    assert replicates.shape == (20,) and replicates.std() > 0


def test_paired_fid_differences_rank_a_shift_and_cancel_identical_sets():
    from diffq.metrics.scoring import Scorers

    torch.manual_seed(3)
    scorers = Scorers("digit-classifier", PixelClassifier(), None, None, fid_bootstrap=50)
    images = torch.rand(40, 1, 16, 16)
    fid, std = scorers.fid(images, "a")
    assert std is not None and std > 0
    scorers.fid(images.clone(), "same")
    shifted, _ = scorers.fid(images * 0.5, "dark")
    pairs = scorers.fid_differences(["a", "same", "dark", "never-scored"])
    assert list(pairs) == ["a vs same", "a vs dark", "same vs dark"]
    assert pairs["a vs same"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "a_lower": 0.0}
    dark = pairs["a vs dark"]
    assert dark["difference"] == pytest.approx(fid - shifted) and abs(dark["difference"]) > 0.1
    if dark["difference"] > 0:  # a shift this large wins or loses in every resample
        assert 0 < dark["low"] <= dark["high"] and dark["a_lower"] == 0.0
    else:
        assert dark["low"] <= dark["high"] < 0 and dark["a_lower"] == 1.0
    assert Scorers("digit-classifier", PixelClassifier(), None, None).fid(images) == (pytest.approx(fid), None)
    with pytest.raises(EvaluationInputError, match="fid_bootstrap"):
        Scorers("digit-classifier", PixelClassifier(), None, None, fid_bootstrap=-2)


def test_classifier_features_stay_in_eval_mode():
    feature = fid_mod.ClassifierFeatures(PixelClassifier().train())
    feature.train()
    assert not feature.classifier.training


def test_feature_extractor_falls_back_to_classifier_offline(no_local_weights):
    assert fid_mod.find_inception_weights() is None
    assert fid_mod.inception_available() is False
    name, module = fid_mod.select_feature_extractor("auto", classifier=PixelClassifier())
    assert name == "digit-classifier" and isinstance(module, fid_mod.ClassifierFeatures)
    with pytest.raises(MissingWeightsError, match="Inception"):
        fid_mod.select_feature_extractor("inception-v3")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        fid_mod.select_feature_extractor("resnet")


def test_inception_weights_are_found_locally(no_local_weights, monkeypatch, tmp_path):
    ckpt = no_local_weights / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / fid_mod.INCEPTION_WEIGHT_FILES[0]).write_bytes(b"x")
    assert fid_mod.find_inception_weights() == ckpt / fid_mod.INCEPTION_WEIGHT_FILES[0]
    explicit = tmp_path / "inception.pth"
    monkeypatch.setenv(fid_mod.INCEPTION_WEIGHTS_ENV, str(explicit))
    assert fid_mod.find_inception_weights() is None  # the variable wins, and its file is missing
    explicit.write_bytes(b"x")
    assert fid_mod.find_inception_weights() == explicit


def test_missing_weights_error_is_a_diffq_error():
    assert issubclass(MissingWeightsError, DiffQError)
    assert issubclass(EvaluationInputError, DiffQError)


# --- alignment and CLIP ------------------------------------------------------------------------------------


def test_alignment_counts_agreement_with_prompted_digit():
    torch.manual_seed(0)
    clf = PixelClassifier()
    images = torch.rand(10, 1, 16, 16)
    preds = predict_digits(images, clf)
    digits = preds.tolist()
    assert alignment(images, digits, clf) == 1.0
    digits[:3] = [(d + 1) % 10 for d in digits[:3]]
    assert alignment(images, digits, clf) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        alignment(images, digits[:5], clf)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A one-layer open_clip architecture registered under a test name, with its random weights saved."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "diffq-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "diffq-test-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("diffq-test-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return "diffq-test-tiny-clip", str(folder / "weights.pt")


def test_clip_score_loads_weights_file_and_matches_definition(tiny_clip):
    from diffq.metrics.clip_score import ClipScorer

    arch, path = tiny_clip
    scorer = ClipScorer(arch, path)
    torch.manual_seed(1)
    images = torch.rand(3, 1, 24, 24)
    prompts = ["a handwritten digit 1", "the number two", "7"]
    scores = scorer.scores(images, prompts)
    with torch.no_grad():
        img = scorer.model.encode_image(scorer._prepare(images))
        txt = scorer.model.encode_text(scorer.tokenizer(prompts))
        want = 100 * F.cosine_similarity(img, txt, dim=-1).clamp(min=0)
    assert torch.allclose(scores, want, atol=1e-4)
    assert scorer(images, prompts) == pytest.approx(float(want.mean()), abs=1e-4)
    with pytest.raises(ValueError):
        scorer.scores(images, prompts[:2])


def test_clip_weights_resolve_offline(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kw: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="not in the local cache"):
        resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(MissingWeightsError, match="known tags"):
        resolve_clip_weights("ViT-B-32", "no-such-tag")
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"x")
    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        lambda repo, name, **kw: str(cached) if "laion" in repo else None,
    )
    path, cfg = resolve_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert path == str(cached) and len(cfg["mean"]) == 3
    assert resolve_clip_weights("ViT-B-32", str(cached)) == (str(cached), {})


def test_hub_clip_models_are_refused():
    from diffq.metrics.clip_score import ClipScorer

    with pytest.raises(MissingWeightsError, match="local-dir"):
        ClipScorer("hf-hub:someone/some-clip", "x")


# --- prompts, sharding, reports ----------------------------------------------------------------------------


def test_prompts_file_with_and_without_digits(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("7\ta handwritten seven\n\nthe digit 3\n2\tnumber two\n")
    assert read_prompts_file(f) == [("a handwritten seven", 7), ("the digit 3", None), ("number two", 2)]
    prompts, digits = resolve_prompts("anything", 5, prompts_file=f)
    assert prompts == [
        "a handwritten seven",
        "the digit 3",
        "number two",
        "a handwritten seven",
        "the digit 3",
    ]
    assert digits == [7, None, 2, 7, None]
    with pytest.raises(EvaluationInputError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(EvaluationInputError, match="no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(EvaluationInputError, match="not a bundled model"):
        resolve_prompts("someone/some-model", 3)


def test_bundled_prompts_follow_reference_eval_prompts():
    from diffq.pipelines import reference

    for model in reference.BUNDLED_MODELS:
        prompts, digits = resolve_prompts(model, 12)
        assert list(zip(prompts, digits, strict=True)) == reference.eval_prompts(12)


def test_shards_cover_every_batch_once_and_keep_batches_whole():
    n, bs = 11, 3
    one = shard_batches(n, bs)
    for world in (2, 3, 5):
        parts = [shard_batches(n, bs, r, world) for r in range(world)]
        merged = sorted((b for p in parts for b in p), key=lambda r: r.start)
        assert merged == one  # the same batches, so image i is made in the same batch everywhere
    assert [i for r in one for i in r] == list(range(n))
    with pytest.raises(ValueError):
        shard_batches(4, 2, rank=2, world_size=2)


def _fake_report() -> dict:
    row = {
        "fid": 1.5,
        "alignment": 0.9,
        "clip_score": None,
        "psnr_vs_fp": None,
        "ssim_vs_fp": None,
        "weight_bytes": 2**20,
        "seconds": 1.25,
    }
    return {
        "model": "m",
        "num_images": 3,
        "feature_extractor": "digit-classifier",
        "results": {"fp": row, "w8a8": {**row, "psnr_vs_fp": 30.0, "ssim_vs_fp": 0.99}},
    }


def test_report_files_are_written_atomically(tmp_path):
    report = _fake_report()
    grid = {"fp": torch.rand(3, 1, 16, 16), "w8a8": torch.rand(3, 3, 16, 16)}
    write_report(tmp_path / "out", report, grid, notes=["a note"])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["grid.png", "report.json", "report.md"]  # no temp files left behind
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| w8a8 | 1.5 | 0.900 | – | 30.00 | 0.990 | 1.00 | 1.2 |" in md and "- a note" in md
    from PIL import Image

    with Image.open(tmp_path / "out" / "grid.png") as im:
        assert im.height == 2 * 64 + 3 * 2  # two labelled rows of 64-pixel cells


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import os

    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_markdown_and_grid_shapes():
    md = render_markdown(_fake_report())
    assert md.count("\n| ") == 3  # header + two rows (the separator starts with "|---")
    pair = {"difference": -0.25, "low": -0.5, "high": 0.125, "a_lower": 0.75}
    md = render_markdown(_fake_report() | {"fid_bootstrap": 8, "fid_differences": {"fp vs w8a8": pair}})
    assert "## FID differences (paired bootstrap, 8 resamples" in md
    assert "| fp vs w8a8 | -0.250 | [-0.500, +0.125] | 75% |" in md
    grid = make_grid({"fp": torch.rand(10, 3, 32, 32)})
    assert grid.width > 10 * 64 and grid.height == 64 + 4


def test_importing_metrics_is_light():
    code = (
        "import sys, diffq.metrics as m; "
        "assert 'open_clip' not in sys.modules; "
        "assert 'torchmetrics.image.fid' not in sys.modules; "
        "assert callable(m.psnr) and callable(m.clip_score); "
        "from diffq.metrics.evaluate import evaluate, configure_parser, run, main"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
