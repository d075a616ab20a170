"""Quantize while loading: DiffQConfig as diffusers' quantization_config on a float checkpoint."""

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxTransformer2DModel,
    PipelineQuantizationConfig,
    UNet2DConditionModel,
)

import diffq
from diffq.modules import QUANTIZED_MODULES
from diffq.pipelines.serialization import plan_of
from diffq.pipelines.testing import tiny_flux_pipeline, tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _unet_inputs(unet):
    torch.manual_seed(0)
    return dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 6, unet.config.cross_attention_dim))


@pytest.mark.parametrize("preset, options", [("w4a16-rtn", {}), ("w8a8-rtn", {"activations": "dynamic"})])
def test_quantized_while_loading_is_the_model_quantize_gives_and_round_trips(sd_folder, tmp_path, preset, options):
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet",
                                                quantization_config=diffq.DiffQConfig(preset, **options))
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, QUANTIZED_MODULES)
    after = diffq.quantize(UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet"), preset, progress=False,
                           **options)
    assert plan_of(unet) == plan_of(after) and _same_state(unet, after)
    unet.save_pretrained(tmp_path / "q")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "q")  # a diffq checkpoint now: its plan is stored
    x = _unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(unet(**x).sample, again(**x).sample)


def test_a_flux_transformer_quantized_while_loading(tmp_path):
    tiny_flux_pipeline().transformer.save_pretrained(tmp_path / "fp")
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=diffq.DiffQConfig(
        "w4a16-rtn", exclude="single_transformer_blocks"))
    plan = plan_of(model)
    assert plan.layers and not any(n.startswith("single_transformer_blocks") for n in plan.layers)
    assert plan.selection == {"exclude": ["single_transformer_blocks"]}
    after = diffq.quantize(FluxTransformer2DModel.from_pretrained(tmp_path / "fp"), "w4a16-rtn",
                           exclude="single_transformer_blocks", progress=False)
    assert _same_state(model, after)


def test_pipeline_quantization_config_by_mapping_and_by_backend(sd_folder):
    by_mapping = DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"unet": diffq.DiffQConfig("w4a16-rtn")}))
    by_backend = DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(
        quant_backend="diffq", quant_kwargs={"preset": "w4a16-rtn"}, components_to_quantize=["unet"]))
    assert plan_of(by_mapping.unet).preset == plan_of(by_backend.unet).preset == "w4a16-rtn"
    assert _same_state(by_mapping.unet, by_backend.unet)
    assert plan_of(by_mapping.text_encoder) is None  # only what was asked for


def test_presets_that_calibrate_are_refused_with_what_to_do(sd_folder):
    with pytest.raises(diffq.QuantizationInputError, match=r"diffq.quantize\(pipe, 'w4a8'\).*w4a16-rtn"):
        diffq.DiffQConfig("w4a8")
    with pytest.raises(diffq.QuantizationInputError, match="calibrates"):
        diffq.DiffQConfig("w8a8-rtn")  # static activation scales come from calibration
    with pytest.raises(diffq.QuantizationInputError, match="calibrates"):
        diffq.DiffQConfig("w3.5a8")
    with pytest.raises(diffq.UnknownPresetError):
        diffq.DiffQConfig("w5a7")
    with pytest.raises(diffq.QuantizationInputError, match="include is an empty list"):
        diffq.DiffQConfig("w4a16-rtn", include=[])
    with pytest.raises(diffq.DiffQError, match="text encoders"):
        DiffusionPipeline.from_pretrained(sd_folder, quantization_config=PipelineQuantizationConfig(
            quant_backend="diffq", quant_kwargs={"preset": "w4a16-rtn"}, components_to_quantize=["unet", "text_encoder"]))
