"""Single-file checkpoints (#20 item 3): tiny pipelines written in the original layouts, read back
through diffusers' ``from_single_file`` with ``config=`` a local folder, and quantized."""

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection

import diffq
from diffq.cli import main
from diffq.errors import CheckpointError, ModelLoadError, QuantizationInputError, UnsupportedTargetError
from diffq.pipelines import testing
from diffq.pipelines.single_file_layouts import (
    any_flux_width,
    bfl_flux_state_dict,
    sd_checkpoint,
    sdxl_checkpoint,
    write_checkpoint,
)
from diffq.pipelines.testing import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PRESET = "w8a16-rtn"  # weight-only round to nearest: no calibration, so the tests stay fast


def _tiny_sdxl_distinct_encoders() -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline with a 96-wide second text encoder. In a single file diffusers tells
    SDXL's two CLIP encoders apart by their width (768 and 1280), so the tiny pair must differ too."""
    pipe = tiny_sdxl_pipeline()
    width = 96
    encoder_2 = CLIPTextModelWithProjection(testing._tiny_clip_config(width, projection_dim=width)).eval()
    time_dim = pipe.unet.config.addition_time_embed_dim
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 64 + width,
                                             "projection_class_embeddings_input_dim": width + 6 * time_dim}).eval()
    parts = {k: v for k, v in pipe.components.items() if k not in ("unet", "text_encoder_2")}
    return StableDiffusionXLPipeline(**parts, unet=unet, text_encoder_2=encoder_2, add_watermarker=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(folder, file): a tiny SD 1.x pipeline saved with save_pretrained and as one LDM checkpoint."""
    root = tmp_path_factory.mktemp("sd-single")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "folder")
    write_checkpoint(sd_checkpoint(pipe), root / "model.safetensors")
    return root / "folder", root / "model.safetensors"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(folder, file): a tiny Flux pipeline saved as a folder, and its transformer in BFL's layout."""
    root = tmp_path_factory.mktemp("flux-single")
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(root / "folder")
    write_checkpoint(bfl_flux_state_dict(pipe.transformer), root / "flux1-tiny.safetensors")
    return root / "folder", root / "flux1-tiny.safetensors"


def _public_config(module) -> dict:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=str))


def _assert_same_models(pipe, reference, components) -> None:
    for name in components:
        got, want = getattr(pipe, name), getattr(reference, name)
        assert _public_config(got) == _public_config(want), name  # the folder's config, not one inferred from the file
        a, b = got.state_dict(), want.state_dict()
        assert set(a) == set(b), name
        assert not any(t.is_meta for t in a.values()), name
        assert all(torch.equal(a[k], b[k]) for k in b), name


def _quantized_state(pipe) -> dict:
    return diffq.pipelines.denoiser_of(pipe).state_dict()


def _assert_same_quantized(a, b) -> None:
    x, y = _quantized_state(a), _quantized_state(b)
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert diffq.pipelines.serialization.plan_of(diffq.pipelines.denoiser_of(a)) is not None


def test_sd_file_is_in_the_ldm_layout_and_round_trips(sd):
    folder, file = sd
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys  # the first up level's upsampler
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "down_blocks.")) for k in keys)

    pipe = diffq.load(file, pipeline_class=StableDiffusionPipeline, config=folder)
    assert isinstance(pipe, StableDiffusionPipeline)
    reference = StableDiffusionPipeline.from_pretrained(folder)
    _assert_same_models(pipe, reference, ("unet", "vae", "text_encoder"))
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)


def test_sd_file_quantizes_like_its_folder(sd):
    folder, file = sd
    from_file = diffq.quantize(str(file), PRESET, pipeline_class="StableDiffusionPipeline", config=folder,
                               progress=False)
    _assert_same_quantized(from_file, diffq.quantize(str(folder), PRESET, progress=False))


def test_pickle_checkpoint_only_with_opt_in(sd, tmp_path):
    folder, file = sd
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(file))}, ckpt)
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        diffq.load(ckpt, pipeline_class=StableDiffusionPipeline, config=folder)
    pipe = diffq.load(ckpt, pipeline_class=StableDiffusionPipeline, config=folder, allow_pickle=True)
    _assert_same_models(pipe, StableDiffusionPipeline.from_pretrained(folder), ("unet",))


def test_flux_transformer_file_round_trips_and_quantizes_like_its_folder(flux):
    folder, file = flux
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert {"img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"} <= keys
    reference = FluxPipeline.from_pretrained(folder)
    with any_flux_width():  # diffusers' converter assumes Flux.1's width 3072; the tiny one is 64 wide
        pipe = diffq.load(file, pipeline_class=FluxPipeline, config=folder)
        _assert_same_models(pipe, reference, ("transformer", "vae", "text_encoder", "text_encoder_2"))
        from_file = diffq.quantize(str(file), PRESET, pipeline_class=FluxPipeline, config=str(folder), progress=False)
    _assert_same_quantized(from_file, diffq.quantize(str(folder), PRESET, progress=False))


def test_sdxl_file_round_trips(tmp_path):
    pipe = _tiny_sdxl_distinct_encoders()
    pipe.save_pretrained(tmp_path / "folder")
    write_checkpoint(sdxl_checkpoint(pipe), tmp_path / "sdxl.safetensors")
    loaded = diffq.load(tmp_path / "sdxl.safetensors", pipeline_class=StableDiffusionXLPipeline,
                        config=tmp_path / "folder")
    reference = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    _assert_same_models(loaded, reference, ("unet", "vae", "text_encoder", "text_encoder_2"))


def test_cli_quantizes_a_single_file(sd, tmp_path, capsys):
    folder, file = sd
    out = tmp_path / "q"
    code = main(["quantize", str(file), "--pipeline-class", "StableDiffusionPipeline", "--config", str(folder),
                 "--preset", PRESET, "--out", str(out), "--no-progress"])
    assert code == 0
    assert json.loads((out / "unet" / "config.json").read_text())["quantization_config"]["quant_method"] == "diffq"
    assert json.loads((out / "diffq_report.json").read_text())["model"] == str(file)
    _assert_same_quantized(diffq.load(out), diffq.quantize(str(folder), PRESET, progress=False))


def test_cli_single_file_without_pipeline_class_is_a_clean_error(sd, tmp_path, capsys):
    _, file = sd
    assert main(["quantize", str(file), "--preset", PRESET, "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert "--pipeline-class" in err and "StableDiffusionPipeline" in err and "Traceback" not in err
    assert main(["quantize", str(file), "--pipeline-class", "NoSuchPipeline", "--out", str(tmp_path / "q")]) == 1
    assert "not a diffusers pipeline class" in capsys.readouterr().err


def test_bad_single_file_inputs(sd, tmp_path):
    folder, file = sd
    with pytest.raises(ModelLoadError, match="looks like a StableDiffusionPipeline: pass pipeline_class="):
        diffq.quantize(str(file), PRESET)
    with pytest.raises(ModelLoadError, match="does not exist"):
        diffq.quantize(str(tmp_path / "missing.safetensors"), PRESET, pipeline_class=StableDiffusionPipeline)
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        diffq.quantize(str(garbage), PRESET, pipeline_class=StableDiffusionPipeline, config=folder)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ModelLoadError, match="is a file"):
        diffq.quantize(str(text), PRESET, pipeline_class=StableDiffusionPipeline)
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        diffq.load(file, pipeline_class=StableDiffusionPipeline, config=folder / "unet")
    with pytest.raises(UnsupportedTargetError, match="not a diffusers pipeline class"):
        diffq.load(file, pipeline_class=torch.nn.Linear, config=folder)
    with pytest.raises(QuantizationInputError, match="single-file checkpoint"):
        diffq.quantize(tiny_sd_pipeline(), PRESET, pipeline_class=StableDiffusionPipeline)
    with pytest.raises(ModelLoadError, match="config= is for single-file checkpoints"):
        diffq.load(folder, config=folder)


def test_single_file_without_config_offline_says_to_pass_config(sd, monkeypatch):
    _, file = sd
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"if you are offline, pass config="):
        diffq.load(file, pipeline_class=StableDiffusionPipeline)
