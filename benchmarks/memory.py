"""Denoiser weight bytes at real sizes: fp16, every diffq preset, optimum-quanto and torchao.

    python benchmarks/memory.py [--models sd15,sdxl,pixart-sigma,flux] [--out benchmarks/results/memory]

The SD 1.5 UNet, SDXL UNet, PixArt-Σ transformer and Flux.1 transformer are built from their
published configs (written below; the hub is not reached) on the ``meta`` device in float16, so
nothing is allocated and the whole run takes seconds. Bytes are counted with the arithmetic of the
real stored formats, layer by layer:

* diffq: what :class:`diffq.QuantizedLinear` / :class:`diffq.QuantizedConv2d` register — packed
  codes (``ceil(cols * bits / 8)`` bytes per row), one 16-bit scale per row (8-bit) or per group of
  64 (4-bit), the bias, static activation scales (float32), and for ``w4a4`` the rank-32 16-bit
  low-rank branch — on the layers the model's adapter quantizes; the layers it keeps in 16-bit and
  every other parameter or buffer count at 2 bytes. Calibrated presets choose a few per-layer
  extras from calibration statistics (timestep-grouped activation scales, a smoothing vector per
  Linear or convolution, BOS vectors for cross-attention key/value projections); with no statistics
  here they are counted at their upper bound (4 timestep groups, every such layer smoothed, BOS on every
  cross-attention key/value projection of a CLIP-conditioned model): at most 0.25% of any total.
  ``tests/test_benchmarks.py`` checks this arithmetic against :func:`diffq.weight_bytes` on real
  quantized models for every preset.
* mixed precision (``w4.0a8``, ``w3.5a8``): the per-layer bits come from a sensitivity analysis of
  the real model, so the figure is the bound the integer program guarantees: quantized layers' codes
  and low-rank branches take at most ``budget / 8`` bytes per weight, plus each layer's largest
  possible scales and extras (marked ``≤``).
* optimum-quanto (0.2.x, its default: every Linear, Conv2d — and LayerNorm when activations are
  quantized): int8 codes with a 16-bit scale per output channel; int4 codes packed two per byte
  with a 16-bit scale and a 16-bit shift per group of up to 128 (quanto's group rule); two scalar
  activation-scale buffers per quantized module.
* torchao (0.18, its default: every Linear): ``Int8WeightOnlyConfig`` and
  ``Int8DynamicActivationInt8WeightConfig`` store int8 codes, a float32 scale and an int8 zero point
  per row; ``Int4WeightOnlyConfig`` (``plain``, group 128) packs two codes per byte with a 16-bit
  scale and zero point per group and leaves layers whose width 128 does not divide in 16-bit;
  ``IntxWeightOnlyConfig(int4, group 32)`` — the int4 path that runs on a CPU — keeps one code per
  byte (``unpacked_to_int8``) with a 16-bit scale and an int8 zero point per group.

Ratios are to the fp16 model and to the 4-bit physical limit (every parameter at 4 bits:
``params x 0.5`` bytes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffq.layers import layer_columns, supports_branch
from diffq.modules import stored_tensors
from diffq.plan import LayerConfig

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results

# --- published configs (the config.json of each model's denoiser folder, defaults dropped) --------

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json: 859,520,964 parameters
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: 2,567,463,684 parameters
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
PIXART_SIGMA = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json: 610,856,096 parameters
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, attention_type="default",
    caption_channels=4096, cross_attention_dim=1152, dropout=0.0, in_channels=4, interpolation_scale=2,
    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2,
    sample_size=128, upcast_attention=False, use_additional_conditions=False,
)  # (the published file also lists double_self_attention, only_cross_attention and use_linear_projection,
#     all false, which PixArtTransformer2DModel ignores)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json: 11,901,408,320 parameters
    attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
    pooled_projection_dim=768,
)


@dataclass(frozen=True)
class ModelSpec:
    label: str
    cls: str  # diffusers class name
    config: Mapping[str, Any]
    text_bos: bool  # its text encoder starts prompts with a BOS token (CLIP), so BOS handling applies


MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("SD 1.5 UNet", "UNet2DConditionModel", SD15_UNET, True),
    "sdxl": ModelSpec("SDXL UNet", "UNet2DConditionModel", SDXL_UNET, True),
    "pixart-sigma": ModelSpec("PixArt-Σ transformer", "PixArtTransformer2DModel", PIXART_SIGMA, False),
    "flux": ModelSpec("Flux.1 transformer", "FluxTransformer2DModel", FLUX_DEV, False),
}

DIFFQ_PRESETS = ["w8a8", "w4a8", "w4a16", "w4a4", "w4.0a8", "w3.5a8", "w8a8:temporal_bits=8",
                 "w4a8:temporal_bits=4"]
PEERS = ["quanto-w8a8", "quanto-w8a16", "quanto-w4a16", "torchao-w8a16", "torchao-w8a8", "torchao-w4a16",
         "torchao-w4a16-intx"]


def build(spec: ModelSpec, device: str | torch.device = "meta", dtype: torch.dtype = torch.float16) -> nn.Module:
    """The denoiser of ``spec`` with random (on ``meta``: no) weights."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    cls = getattr(diffusers, spec.cls)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # `.to(float16)` warns about float32-kept modules (it has none)
    try:
        with torch.device(device):
            model = cls.from_config(dict(spec.config))
        return model.to(dtype).eval()
    finally:
        diffusers_logging.set_verbosity(level)


# --- tensor arithmetic ----------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores; a tensor subclass (quanto's QBytesTensor/QBitsTensor and PackedTensor,
    torchao's Int8Tensor/Int4Tensor/...) is counted through its inner tensors, not at its dense size."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(t, n) for n in names) if inner is not None)
    return t.numel() * t.element_size()


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored: what :func:`diffq.weight_bytes` counts,
    with quantized tensor subclasses counted by their packed data, scales and zero points."""
    return sum(tensor_bytes(t) for t in stored_tensors(module))


def _own_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))


# --- diffq -----------------------------------------------------------------------------------------


def diffq_layer_bytes(module: nn.Module, config: LayerConfig) -> int:
    """Bytes of the quantized module diffq makes of ``module`` (nn.Linear or nn.Conv2d) under ``config``,
    following the buffers of :mod:`diffq.modules` (weight dtype for scales, bias, smoothing, BOS and
    the low-rank branch; uint8 codes and zero points; float32 activation scales)."""
    from diffq.formats import packed_cols

    dt = module.weight.element_size()
    rows, cols = module.weight.shape[0], layer_columns(module)
    blocks = 1 if config.w_group_size is None else cols // config.w_group_size
    total = rows * packed_cols(cols, config.w_bits) + rows * blocks * dt
    if not config.w_symmetric:
        total += rows * blocks
    if config.static_activations:
        total += config.a_groups * (2 if config.a_split else 1) * 4
        total += (config.a_groups - 1) * 4 if config.a_groups > 1 else 0
    if module.bias is not None:
        total += rows * dt
    if config.smooth_alpha is not None:  # one factor per input channel
        total += (module.in_features if isinstance(module, nn.Linear) else module.in_channels) * dt
    if isinstance(module, nn.Linear) and config.bos:
        total += (module.in_features + module.out_features) * dt
    total += config.rank * (cols + rows) * dt
    return total


def planned_bytes(model: nn.Module, configs: Mapping[str, LayerConfig]) -> int:
    """Bytes of ``model`` after diffq replaces the layers named in ``configs``: those layers' quantized
    buffers plus every other parameter and buffer as it is."""
    replaced = sum(_own_bytes(model.get_submodule(name)) for name in configs)
    quantized = sum(diffq_layer_bytes(model.get_submodule(name), c) for name, c in configs.items())
    return stored_bytes(model) - replaced + quantized


def _layers(model: nn.Module):
    from diffq.pipelines.adapters import adapter_for

    adapter = adapter_for(model)
    layers, _kept = adapter.layers(model)
    return adapter, layers


def _with_upper_bound_extras(
    name: str, module: nn.Module, config: LayerConfig, splits: Mapping[str, int], bos: set[str]
) -> LayerConfig:
    """What a calibrated plan may add to a layer's config, at its largest (see ``diffq.planning``)."""
    from diffq.planning import CalibrationOptions

    options = CalibrationOptions()
    changes: dict[str, Any] = {}
    if config.static_activations:
        changes["a_groups"] = options.timestep_groups
    if isinstance(module, nn.Conv2d) and name in splits and config.a_bits is not None:
        changes["a_split"] = splits[name]
    if supports_branch(module):
        changes["smooth_alpha"] = 0.5
    if isinstance(module, nn.Linear):
        changes["bos"] = name in bos
    return replace(config, **changes)


def split_spec(preset: str) -> tuple[str, int | None]:
    """``"w4a8:temporal_bits=4"`` -> ``("w4a8", 4)``: a preset and its ``temporal_bits`` option
    (parsed like ``diffq eval``'s presets; the only option whose bytes this script counts)."""
    from diffq.metrics.evaluate import preset_spec

    name, options = preset_spec(preset)
    if set(options) - {"temporal_bits"}:
        raise ValueError(f"{preset!r}: the only option memory.py counts is temporal_bits=N.")
    return name, options.get("temporal_bits")


def preset_configs(model: nn.Module, preset: str, text_bos: bool = True) -> dict[str, LayerConfig]:
    """Per-layer configs of a uniform preset on ``model`` without calibration statistics: exact for
    ``-rtn`` presets, calibrated extras at their upper bound otherwise (see the module docstring).
    ``preset`` may carry ``:temporal_bits=N`` (the temporal modulation layers weight-only)."""
    from diffq.layers import resolve_config
    from diffq.presets import get_preset, temporal_config

    name, temporal_bits = split_spec(preset)
    recipe = get_preset(name)
    if recipe.is_mixed:
        raise ValueError(f"{preset!r} is mixed precision; use mixed_bound().")
    adapter, layers = _layers(model)
    configs = {n: resolve_config(module, recipe.layer) for n, module in layers.items()}
    if recipe.calibration is not None:
        splits = adapter.concat_splits(model)
        bos = adapter.bos_layers(set(layers)) if text_bos else set()
        configs = {n: _with_upper_bound_extras(n, layers[n], c, splits, bos) for n, c in configs.items()}
    if temporal_bits is not None:
        config = temporal_config(temporal_bits)
        configs.update({n: resolve_config(m, config) for n, m in adapter.temporal_layers(model).items()})
    return configs


def mixed_bound(model: nn.Module, preset: str, text_bos: bool = True, budget: float | None = None) -> int:
    """At most this many bytes for a mixed-precision preset (``w3.5a8``, ``mixed``): its integer
    program caps packed codes plus 16-bit low-rank branches at ``budget`` bits per quantized weight
    (:func:`diffq.sensitivity.weight_bits_cost`); on top, each layer gets the largest scales and
    extras any of its candidates has, and one byte of row padding per row. ``budget`` replaces the
    preset's own (like ``diffq.quantize(..., budget=)``)."""
    from diffq.formats import packed_cols
    from diffq.layers import resolve_config
    from diffq.presets import get_preset
    from diffq.sensitivity import candidate_config

    recipe = get_preset(preset)
    budget = recipe.budget if budget is None else budget
    if not recipe.is_mixed or budget is None:
        raise ValueError(f"{preset!r} is not a mixed-precision preset with a budget.")
    adapter, layers = _layers(model)
    splits = adapter.concat_splits(model)
    bos = adapter.bos_layers(set(layers)) if text_bos else set()
    total = stored_bytes(model)
    params = 0
    for name, module in layers.items():
        rows, cols = module.weight.shape[0], layer_columns(module)
        overhead = 0
        for candidate in recipe.candidates:
            if candidate.rank and not supports_branch(module):
                continue  # the allocation gives grouped convolutions no low-rank branch
            config = resolve_config(module, candidate_config(candidate))
            config = _with_upper_bound_extras(name, module, config, splits, bos)
            counted = rows * packed_cols(cols, config.w_bits)  # codes: what the budget counts ...
            counted += 2 * config.rank * (cols + rows)  # ... and the branch at 16 bits
            overhead = max(overhead, diffq_layer_bytes(module, config) - counted)
        total += overhead + rows - _own_bytes(module)
        params += module.weight.numel()
    return total + math.floor(budget * params / 8)


def diffq_bytes(model: nn.Module, preset: str, text_bos: bool = True) -> tuple[int, str, bool]:
    """Bytes of ``model`` under a diffq preset, a note, and whether the bytes are an upper bound."""
    from diffq.presets import get_preset

    name, temporal_bits = split_spec(preset)
    recipe = get_preset(name)
    if recipe.is_mixed:
        note = f"at most: codes + branches ≤ {recipe.budget:g} bits per quantized weight"
        return mixed_bound(model, preset, text_bos), note, True
    note = recipe.description.split(",")[0]
    if temporal_bits is not None:
        note += f"; temporal modulation layers int{temporal_bits} weight-only"
    return planned_bytes(model, preset_configs(model, preset, text_bos)), note, False


def kept_fraction(model: nn.Module) -> float:
    """Fraction of the parameters that diffq leaves in 16-bit (its adapter's kept layers and every
    parameter that is not a Linear or Conv2d weight)."""
    _adapter, layers = _layers(model)
    quantized = sum(m.weight.numel() for m in layers.values())
    return 1 - quantized / sum(p.numel() for p in model.parameters())


# --- peers ------------------------------------------------------------------------------------------


def quanto_group_size(module: nn.Module) -> int | None:
    """optimum-quanto's group for int2/int4 weights: 128, or the largest multiple of 32 below it that
    divides the row, or none (per output channel) for rows of 128 or less (``QModuleMixin.__init__``)."""
    in_features = module.weight.numel() // module.weight.shape[0]
    group = 128
    if in_features > group:
        while in_features % group != 0 and group > 32:
            group -= 32
        if in_features % group == 0:
            return group
    return None


def quanto_bytes(model: nn.Module, bits: int, activations: bool = False) -> int:
    """optimum-quanto ``quantize(model, weights=qint{bits}, activations=qint8 or None)`` + ``freeze``."""
    total = stored_bytes(model)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            if activations:  # QLayerNorm: activation scales only; float32 without an affine weight
                total += 2 * (4 if module.weight is None else module.weight.element_size())
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w = module.weight
        dt = w.element_size()
        total += 2 * dt - w.numel() * dt  # input/output scale buffers; the float weight goes
        if bits == 8:
            total += w.numel() + w.shape[0] * dt
            continue
        group = quanto_group_size(module)
        rows, cols = (w.numel() // group, group) if group else (w.shape[0], w.numel() // w.shape[0])
        total += math.ceil(rows / 2) * cols + 2 * rows * dt  # packed codes; scale and shift per group
    return total


def _torchao_linears(model: nn.Module) -> Iterable[nn.Linear]:
    return (m for m in model.modules() if isinstance(m, nn.Linear)
            and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear))


def torchao_int8_bytes(model: nn.Module) -> int:
    """torchao ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig``: int8 codes,
    float32 scale and int8 zero point per row."""
    total = stored_bytes(model)
    for m in _torchao_linears(model):
        w = m.weight
        total += w.numel() + 5 * w.shape[0] - w.numel() * w.element_size()
    return total


def torchao_int4_bytes(model: nn.Module, group_size: int = 128) -> int:
    """torchao ``Int4WeightOnlyConfig(group_size=128)`` (``plain`` packing, bfloat16): two codes per
    byte, a 16-bit scale and zero point per group; rows that the group does not divide stay 16-bit."""
    total = stored_bytes(model)
    for m in _torchao_linears(model):
        w = m.weight
        if w.shape[-1] % group_size:
            continue
        groups = w.numel() // group_size
        total += w.numel() // 2 + 2 * groups * 2 - w.numel() * w.element_size()
    return total


def torchao_intx4_bytes(model: nn.Module, group_size: int = 32) -> int:
    """torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``: one int4
    code per int8 byte, a scale (weight dtype) and an int8 zero point per group."""
    total = stored_bytes(model)
    for m in _torchao_linears(model):
        w = m.weight
        groups = w.numel() // group_size
        total += w.numel() + groups * (w.element_size() + 1) - w.numel() * w.element_size()
    return total


PEER_BYTES: dict[str, tuple[Callable[[nn.Module], int], str]] = {
    "quanto-w8a8": (lambda m: quanto_bytes(m, 8, activations=True), "qint8 weights, qint8 activations"),
    "quanto-w8a16": (lambda m: quanto_bytes(m, 8), "qint8 weights"),
    "quanto-w4a16": (lambda m: quanto_bytes(m, 4), "qint4 weights, groups of up to 128"),
    "torchao-w8a16": (torchao_int8_bytes, "Int8WeightOnlyConfig"),
    "torchao-w8a8": (torchao_int8_bytes, "Int8DynamicActivationInt8WeightConfig (same weights)"),
    "torchao-w4a16": (torchao_int4_bytes, "Int4WeightOnlyConfig, group 128 (CUDA only)"),
    "torchao-w4a16-intx": (torchao_intx4_bytes, "IntxWeightOnlyConfig int4, group 32, one code per byte"),
}


# --- the table ------------------------------------------------------------------------------------


def rows_for(key: str, presets: list[str], peers: list[str]) -> list[dict[str, Any]]:
    spec = MODELS[key]
    model = build(spec)
    params = sum(p.numel() for p in model.parameters())
    fp16 = stored_bytes(model)
    limit = params // 2
    out = [{"model": spec.label, "method": "fp16", "library": "–", "bytes": fp16, "bound": False,
            "note": f"diffq keeps {100 * kept_fraction(model):.1f}% of the parameters in 16-bit"}]
    for preset in presets:
        num_bytes, note, bound = diffq_bytes(model, preset, spec.text_bos)
        out.append({"model": spec.label, "method": preset, "library": "diffq", "bytes": num_bytes, "bound": bound,
                    "note": note})
    for peer in peers:
        fn, note = PEER_BYTES[peer]
        out.append({"model": spec.label, "method": peer, "library": peer.split("-")[0], "bytes": fn(model),
                    "bound": False, "note": note})
    for row in out:
        row.update(params=params, vs_fp16=row["bytes"] / fp16, vs_4bit_limit=row["bytes"] / limit,
                   bits_per_param=8 * row["bytes"] / params)
    return out


def render(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    table = markdown(
        ["model", "params", "method", "library", "MiB", "x fp16", "x 4-bit limit", "bits/param", "note"],
        [[r["model"], f"{r['params']:,}", r["method"], r["library"],
          ("≤ " if r["bound"] else "") + mib(r["bytes"], 1), f"{r['vs_fp16']:.3f}",
          f"{r['vs_4bit_limit']:.3f}", f"{r['bits_per_param']:.2f}", r["note"]]
         for r in rows],
    )
    return "\n\n".join([
        "**Denoiser weight bytes at real sizes** (`python benchmarks/memory.py`): every parameter and buffer "
        "of the denoiser, built from its published config on the meta device in float16.",
        table,
        "MiB: 2^20 bytes. x 4-bit limit: bytes / (params x 0.5). bits/param: 8 x bytes / params. diffq's "
        "calibrated extras are counted at their upper bound; mixed precision (≤) is the bound its integer "
        "program guarantees. diffq keeps first/last layers, embeddings and timestep modulation (AdaLN) "
        "layers in 16-bit (`:temporal_bits=N` rows: the modulation layers int-N weight-only); quanto "
        "quantizes every Linear and Conv2d, torchao every Linear. torchao's int4 "
        "weight-only config needs CUDA here (benchmarks/quality.py records the error); its CPU int4 path "
        "(intx) stores one code per byte.",
        machine_line(info),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--presets", default=",".join(DIFFQ_PRESETS), help="comma-separated diffq presets")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}; "
                        "'none' for none")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "memory", help="output folder")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    presets = [p for p in args.presets.split(",") if p]
    unknown = [m for m in models if m not in MODELS] + [p for p in peers if p not in PEER_BYTES]
    if unknown:
        parser.error(f"unknown model or peer {unknown}")
    info = machine()
    rows = [row for key in models for row in rows_for(key, presets, peers)]
    text = render(rows, info)
    print(text)
    paths = write_results(args.out, text, {"machine": info, "rows": rows})
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
