"""benchmarks/peers.py: NVIDIA ModelOpt and SDNQ as quality.py's peers — their bytes against hand
counts (and, for ModelOpt, against what its own export writes), and the ``@diffq`` scope against
the layers diffq quantizes. Skipped where the `bench` extra (nvidia-modelopt, sdnq) is missing."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffq.pipelines import denoiser_of
from diffq.pipelines.testing import tiny_call_kwargs, tiny_pixart_pipeline, tiny_sd_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402
from memory import stored_bytes  # noqa: E402

F32 = 4  # bytes of a float32 (the tiny models' dtype, and ModelOpt's exported scales)


def _context(pipe) -> peers.PeerContext:
    return peers.PeerContext(prompts=["a handwritten digit 3"], steps=1, call_kwargs=tiny_call_kwargs(pipe))


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64, bias=False), nn.LayerNorm(64))


# Hand counts for _tiny_mlp (float32): Linear(256->128, bias), Linear(128->64), LayerNorm(64) = 512 bytes.
_BIAS0, _NORM = 128 * F32, 2 * 64 * F32
_MLP_BYTES = {
    # int8 codes + a float32 scale per output channel + float32 input scale + float32 smoothing per input
    "INT8_SMOOTHQUANT_CFG": (128 * 256 + 128 * F32 + F32 + 256 * F32 + _BIAS0)
                            + (64 * 128 + 64 * F32 + F32 + 128 * F32) + _NORM,
    # int4 codes two per byte + a float32 scale per 128-block + the AWQ pre_quant_scale per input
    "INT4_AWQ_CFG": (128 * 256 // 2 + 128 * 2 * F32 + 256 * F32 + _BIAS0)
                    + (64 * 128 // 2 + 64 * 1 * F32 + 128 * F32) + _NORM,
    # the same + float32 weight_scale_2 (the fp8 step) + float32 input scale, per layer
    "W4A8_AWQ_BETA_CFG": (128 * 256 // 2 + 128 * 2 * F32 + 2 * F32 + 256 * F32 + _BIAS0)
                         + (64 * 128 // 2 + 64 * 1 * F32 + 2 * F32 + 128 * F32) + _NORM,
    # NVFP4 codes two per byte + one fp8 (1 byte) scale per 32-block + float32 weight_scale_2 + input scale
    "W4A8_NVFP4_FP8_CFG": (128 * 256 // 2 + 128 * 256 // 32 + 2 * F32 + _BIAS0)
                          + (64 * 128 // 2 + 64 * 128 // 32 + 2 * F32) + _NORM,
    # (weights calibrated only: its NVFP4 inputs need CUDA) codes + fp8 scale per 16-block + weight_scale_2
    # + the rank-32 float32 factors lora_a [32, in] and lora_b [out, 32]
    "NVFP4_SVDQUANT_DEFAULT_CFG": (128 * 256 // 2 + 128 * 256 // 16 + F32 + 32 * (256 + 128) * F32 + _BIAS0)
                                  + (64 * 128 // 2 + 64 * 128 // 16 + F32 + 32 * (128 + 64) * F32) + _NORM,
}


def _exported_bytes(model: nn.Module) -> int:
    """Bytes of the state dict ModelOpt's diffusers export saves for ``model`` (its per-layer steps:
    pack each quantized Linear, promote pre_quant_scale and the SVDQuant factors, hide the quantizers)."""
    from modelopt.torch.export.diffusers_utils import hide_quantizers_from_state_dict
    from modelopt.torch.export.layer_utils import is_quantlinear
    from modelopt.torch.export.unified_export_hf import (
        _export_quantized_weight,
        _promote_quantizer_tensors_to_module,
    )

    model = copy.deepcopy(model)
    for module in model.modules():
        if is_quantlinear(module):
            _export_quantized_weight(module, torch.float32)
    _promote_quantizer_tensors_to_module(model)
    with hide_quantizers_from_state_dict(model):
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("config", list(_MLP_BYTES))
def test_modelopt_bytes_match_a_hand_count_and_its_export(config):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    model = _tiny_mlp()
    x = torch.randn(16, 256)
    float_bytes = stored_bytes(model)
    weight_only_here = config == "NVFP4_SVDQUANT_DEFAULT_CFG" and not torch.cuda.is_available()
    mtq.quantize(model, peers.modelopt_config(config), None if weight_only_here else (lambda m: m(x)))
    counted = peers.modelopt_stored_bytes(model)
    assert counted == _MLP_BYTES[config]
    assert counted == _exported_bytes(model)  # what ModelOpt's own export writes
    assert counted < float_bytes
    assert stored_bytes(model) > float_bytes  # the fake-quantized model: float weights plus quantizer state
    assert peers.quantized_modules(model) - {"3"} == {"0", "2"}  # ("3": ModelOpt quantizes LayerNorm inputs too)


def _modelopt_layer_bytes(config: str, layer: nn.Module) -> int:
    """The hand count of one quantized Linear or Conv2d of the tiny pipelines (float32, calibrated
    inputs). Block scales run along the weight's last dimension (a Conv2d's kernel width); only
    Linear layers are smoothed (a float32 pre_quant_scale per input channel)."""
    numel, out, cols = layer.weight.numel(), layer.weight.shape[0], layer.weight.shape[-1]
    rows = numel // cols
    bias = 0 if layer.bias is None else out * F32
    smooth = layer.in_features * F32 if isinstance(layer, nn.Linear) else 0
    return bias + {
        "INT8_SMOOTHQUANT_CFG": numel + out * F32 + F32 + smooth,
        "W4A8_AWQ_BETA_CFG": numel // 2 + rows * math.ceil(cols / 128) * F32 + 2 * F32 + smooth,
        "INT4_AWQ_CFG": numel // 2 + rows * math.ceil(cols / 128) * F32 + smooth,
        "W4A8_NVFP4_FP8_CFG": numel // 2 + rows * math.ceil(cols / 32) + 2 * F32,
    }[config]


def _own_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module._parameters.values() if p is not None)


@pytest.mark.parametrize("scope", ["", "@diffq"])
@pytest.mark.parametrize("suffix", ["int8-sq", "w4a8-awq", "int4-awq", "w4a8-nvfp4-fp8"])
def test_modelopt_peers_on_a_tiny_dit(suffix, scope):
    """Each ModelOpt peer quantizes the tiny PixArt denoiser (at its default scope, or exactly diffq's
    layers, whose other weights calibration leaves untouched); bytes: the hand count, whole model."""
    pytest.importorskip("modelopt.torch.quantization")
    config = peers.MODELOPT_CONFIGS[suffix]
    pipe = tiny_pixart_pipeline()
    denoiser = denoiser_of(pipe)
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    float_bytes = stored_bytes(denoiser)
    layers = set(peers.diffq_scope(denoiser))
    counted = peers.PEERS[f"modelopt-{suffix}{scope}"](_context(pipe))(pipe)
    quantized = peers.quantized_modules(denoiser)
    if scope:
        assert quantized == layers
        untouched = {k for k, v in denoiser.state_dict().items() if k in before and torch.equal(v, before[k])}
        assert {k for k in before if k.rsplit(".", 1)[0] not in layers} <= untouched  # no smoothing outside
    else:
        assert quantized > layers  # ModelOpt's default also takes the time/caption embeddings (and norm_out's input)
        assert "adaln_single.emb.timestep_embedder.linear_1" in quantized
    weighted = {n for n in quantized if peers._enabled(getattr(denoiser.get_submodule(n), "weight_quantizer", None))}
    layer = denoiser.get_submodule("transformer_blocks.0.attn1.to_q")
    assert peers.modelopt_module_bytes(layer) == _modelopt_layer_bytes(config, layer)
    float_layers = sum(_own_bytes(denoiser.get_submodule(n)) for n in weighted)  # (same shapes after smoothing)
    hand = sum(_modelopt_layer_bytes(config, denoiser.get_submodule(n)) for n in weighted)
    assert counted == float_bytes - float_layers + hand
    assert counted < 0.55 * float_bytes if scope else counted < 0.35 * float_bytes


def _tiny_unet_at_diffq_scope(peer: str):
    """``(pipe, its unet, the unet's float bytes, the peer's counted bytes, diffq's layers)`` after ``peer`` quantized a
    tiny SD pipeline, checked to have quantized exactly diffq's layers."""
    pipe = tiny_sd_pipeline()
    unet = denoiser_of(pipe)
    float_bytes = stored_bytes(unet)
    counted = peers.PEERS[peer](_context(pipe))(pipe)
    layers = set(peers.diffq_scope(unet))
    assert peers.quantized_modules(unet) == layers
    return pipe, unet, float_bytes, counted, layers


def test_modelopt_int8_sq_at_diffq_scope_on_a_unet():
    """On the UNet, diffq's scope includes the convolutions and the attention proj_out layers
    (ModelOpt's default leaves ``*proj_out.*`` out) and excludes conv_in/conv_out and the time layers."""
    pytest.importorskip("modelopt.torch.quantization")
    _pipe, unet, float_bytes, counted, layers = _tiny_unet_at_diffq_scope("modelopt-int8-sq@diffq")
    assert "down_blocks.0.attentions.0.proj_out" in layers and "conv_in" not in layers
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")  # Conv2d(64, 64, 3): not smoothed
    assert peers.modelopt_module_bytes(conv) == 64 * 64 * 9 + 64 * F32 + F32 + 64 * F32
    linear = unet.get_submodule("down_blocks.0.attentions.0.proj_out")
    assert peers.modelopt_module_bytes(linear) == _modelopt_layer_bytes("INT8_SMOOTHQUANT_CFG", linear)
    assert counted < 0.4 * float_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU failure of ModelOpt's NVFP4 path")
def test_modelopt_nvfp4_fails_on_a_cpu_with_its_error():
    """quality.py lists these with their error (evaluate records it per method)."""
    pytest.importorskip("modelopt.torch.quantization")
    pipe = tiny_pixart_pipeline()
    with pytest.raises(AssertionError, match="CUDA"):
        peers.PEERS["modelopt-nvfp4-svdquant@diffq"](_context(pipe))(pipe)
    pipe = tiny_pixart_pipeline()
    peers.PEERS["modelopt-w4a8-nvfp4-fp8"](_context(pipe))(pipe)  # calibration runs ...
    with pytest.raises(AssertionError, match="CUDA"):  # ... generating does not
        pipe(prompt=["a handwritten digit 1"], num_inference_steps=1, output_type="latent", **tiny_call_kwargs(pipe))


def _sdnq_linear_bytes(weights: str, svd: bool, out: int, cols: int, bias: bool) -> int:
    """SDNQ's stored tensors for a Linear(cols -> out) (float32 model): int8 codes with a float32
    scale per row (its groups are 1024 wide for int8, more than these widths), or uint4 codes two per
    byte with a float32 scale and zero point per group of 64 (128 with the SVD branch), plus the
    rank-32 float32 factors svd_up [out, 32] and svd_down [32, cols]."""
    total = out * F32 if bias else 0
    if weights == "int8":
        return total + out * cols + out * F32
    groups = max(1, cols // (128 if svd else 64))
    return total + out * cols // 2 + 2 * out * groups * F32 + (32 * (out + cols) * F32 if svd else 0)


@pytest.mark.parametrize("scope", ["", "@diffq"])
@pytest.mark.parametrize("suffix", list(peers.SDNQ_CONFIGS))
def test_sdnq_peers_on_a_tiny_dit(suffix, scope):
    pytest.importorskip("sdnq")
    weights, svd = peers.SDNQ_CONFIGS[suffix]
    pipe = tiny_pixart_pipeline()
    denoiser = denoiser_of(pipe)
    float_bytes = stored_bytes(denoiser)
    layers = set(peers.diffq_scope(denoiser))
    shapes = {n: (*denoiser.get_submodule(n).weight.shape, denoiser.get_submodule(n).bias is not None) for n in layers}
    counted = peers.PEERS[f"sdnq-{suffix}{scope}"](_context(pipe))(pipe)
    quantized = peers.quantized_modules(denoiser)
    if scope:
        assert quantized == layers
        name = "transformer_blocks.0.attn1.to_q"  # 64x64: below SDNQ's default minimum of 16384 weights
    else:
        assert quantized == {n for n, (out, cols, _) in shapes.items() if out * cols >= 16384}
        name = "transformer_blocks.0.ff.net.0.proj"
    assert stored_bytes(denoiser.get_submodule(name)) == _sdnq_linear_bytes(weights, svd, *shapes[name])
    float_layers = sum(out * cols * F32 + (out * F32 if bias else 0) for n in quantized for out, cols, bias in [shapes[n]])
    hand = sum(_sdnq_linear_bytes(weights, svd, *shapes[n]) for n in quantized)
    assert counted == float_bytes - float_layers + hand
    assert counted < float_bytes


def test_sdnq_at_diffq_scope_quantizes_the_unets_convolutions():
    pytest.importorskip("sdnq")
    pipe, unet, float_bytes, counted, layers = _tiny_unet_at_diffq_scope("sdnq-uint4@diffq")
    conv = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert type(conv).__name__ == "SDNQConv2d"
    # uint4 codes two per byte; a float32 scale and zero point per group of 32 input channels and tap
    assert stored_bytes(conv) == 64 * 64 * 9 // 2 + 2 * 64 * (64 // 32) * 9 * F32 + 64 * F32
    assert counted < 0.3 * float_bytes
    latent = pipe(prompt=["a handwritten digit 1"], num_inference_steps=1, output_type="latent",
                  **tiny_call_kwargs(pipe)).images
    assert torch.isfinite(latent).all()
