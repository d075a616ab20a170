"""The peer quantizers ``benchmarks/quality.py`` compares diffq with, and how their bytes are counted.

Every peer is a factory ``make(ctx: PeerContext) -> apply(pipe) -> int``: ``apply`` quantizes the
denoiser of a freshly loaded pipeline in place (the denoiser only, as diffq does) and returns the
bytes that denoiser stores. ``PEERS`` maps names to factories; ``DEFAULT_PEERS`` is what
``quality.py`` runs without ``--peers``.

* optimum-quanto (``quanto-w8a8``, ``quanto-w8a16``, ``quanto-w4a16``): ``quantize`` / ``Calibration()``
  / ``freeze``, its default scope (every Linear and Conv2d). Deprecated in diffusers since 2026-03;
  kept for comparison with earlier results.
* torchao (``torchao-w8a8``, ``torchao-w8a16``, ``torchao-w4a16``, ``torchao-w4a16-intx``):
  ``quantize_`` with its configs, its default scope (every Linear).
* NVIDIA ModelOpt (``modelopt-*``): ``mtq.quantize(denoiser, CONFIG, forward_loop)``, calibrated on
  the prompts and steps diffq calibrates with (:func:`_calibration_passes`). Its models are
  fake-quantized, so bytes are counted by :func:`modelopt_stored_bytes` as its export would write them.
* SDNQ (``sdnq-*``): ``sdnq_post_load_quant`` (no calibration), bytes by ``memory.stored_bytes``
  (SDNQ's layers hold plain tensors, counted as they are: int8 codes with a float32 scale per row,
  or uint4 codes packed two per byte with a float32 scale and zero point per group — 64 input
  channels for a Linear, 128 with the SVD branch, 32 per kernel tap for a Conv2d — and the rank-32
  SVD factors at the model's dtype; ``tests/test_peers.py`` checks these against hand counts).

Scopes: a bare ModelOpt/SDNQ name is the library's own default module selection; the same name
with ``@diffq`` quantizes exactly the layers diffq quantizes (:func:`diffq_scope`: every Linear and
Conv2d but the first and last layers, the time/condition embeddings and the layers reading the
timestep embedding), so the two can be compared layer for layer. :func:`quantized_modules` reports
which modules a peer quantized.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memory import stored_bytes

CALIBRATION_STEPS = 8  # diffq.quantize's default num_calibration_steps

Peer = Callable[["PeerContext"], Callable[[Any], int]]


@dataclass(frozen=True)
class PeerContext:
    """What a peer needs besides the pipeline: how to run calibration passes like diffq does."""

    prompts: Sequence[str] | None = None  # None: the pipeline's default calibration prompts
    steps: int = CALIBRATION_STEPS
    seed: int = 0
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)  # on top of the bundled model's defaults


def _calibration_passes(pipe: Any, ctx: PeerContext) -> None:
    """Run ``pipe`` over the calibration prompts, one prompt per call, as ``diffq.calibrate`` does."""
    from diffq.pipelines.calibrate import conditioning, default_call_kwargs, default_prompts

    prompts = list(ctx.prompts) if ctx.prompts is not None else default_prompts(pipe)
    kwargs = {**default_call_kwargs(pipe), **ctx.call_kwargs}
    kwargs.pop("num_inference_steps", None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            pipe(**conditioning(pipe, [prompt]), num_inference_steps=ctx.steps, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(ctx.seed + i), **kwargs)


# --- scope -----------------------------------------------------------------------------------------


def diffq_scope(denoiser: nn.Module) -> list[str]:
    """The names of the layers diffq quantizes in ``denoiser`` (its adapter's quantizable layers)."""
    from diffq.pipelines import adapter_for

    layers, _kept = adapter_for(denoiser).layers(denoiser)
    return list(layers)


def _quantizer_types() -> tuple[type, ...]:
    try:
        from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
    except ImportError:
        return ()
    return (TensorQuantizer, SequentialQuantizer)


def _enabled(quantizer: Any) -> bool:
    """Whether a ModelOpt quantizer (a TensorQuantizer, or a SequentialQuantizer of them) quantizes."""
    if quantizer is None:
        return False
    if isinstance(quantizer, nn.Sequential):
        return any(_enabled(q) for q in quantizer)
    return bool(getattr(quantizer, "is_enabled", False))


def quantized_modules(denoiser: nn.Module) -> set[str]:
    """Names of the modules a peer quantized: with ModelOpt, every module owning an enabled quantizer
    (weight, input or any other); with SDNQ, its converted layers; with quanto and torchao, the
    modules whose weight is one of their quantized tensor subclasses."""
    names = set()
    quantizers = _quantizer_types()
    for name, module in denoiser.named_modules():
        if quantizers and isinstance(module, quantizers):
            continue
        if quantizers and any(isinstance(c, quantizers) and _enabled(c) for c in module.children()):
            names.add(name)
        elif hasattr(module, "sdnq_dequantizer"):
            names.add(name)
        else:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
                names.add(name)  # quanto's QTensor / torchao's AQT and friends
            elif getattr(module, "weight_qtype", None) is not None:  # a frozen-or-not quanto QModule
                names.add(name)
    return names


# --- optimum-quanto and torchao ------------------------------------------------------------------


def quanto(weights: str, activations: str | None = None) -> Peer:
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            from optimum import quanto as q

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            q.quantize(denoiser, weights=getattr(q, weights), activations=activations and getattr(q, activations))
            if activations:
                with q.Calibration():
                    _calibration_passes(pipe, ctx)
            q.freeze(denoiser)
            return stored_bytes(denoiser)

        return apply

    return make


def torchao(config: Callable[[], Any]) -> Peer:
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            from torchao.quantization import quantize_

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            quantize_(denoiser, config())
            return stored_bytes(denoiser)

        return apply

    return make


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_weight_only():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=128)


def _intx4_weight_only():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


# --- NVIDIA ModelOpt -------------------------------------------------------------------------------

MODELOPT_CONFIGS = {  # peer suffix -> modelopt.torch.quantization config (0.47)
    "int8-sq": "INT8_SMOOTHQUANT_CFG",  # int8 per-channel weights, int8 static per-tensor inputs, SmoothQuant
    "w4a8-awq": "W4A8_AWQ_BETA_CFG",  # int4 weights in blocks of 128 then fp8, fp8 inputs, AWQ-lite
    "int4-awq": "INT4_AWQ_CFG",  # int4 weights in blocks of 128, float inputs, AWQ-lite
    "nvfp4-svdquant": "NVFP4_SVDQUANT_DEFAULT_CFG",  # NVFP4 weights and inputs, rank-32 SVDQuant branch
    "w4a8-nvfp4-fp8": "W4A8_NVFP4_FP8_CFG",  # NVFP4 weights (blocks of 32), fp8 inputs
}


def modelopt_config(name: str, layers: Iterable[str] | None = None) -> dict[str, Any]:
    """A copy of ModelOpt's config ``name``; with ``layers``, only those modules' quantizers enabled.

    The scoped ``quant_cfg`` first disables every quantizer, then gives each listed module the
    config's own ``*weight_quantizer`` / ``*input_quantizer`` entries by its exact name — so modules
    the config excludes by pattern (``*proj_out.*``) are quantized when listed, and unlisted ones
    have no enabled quantizer when calibration runs: AWQ and SmoothQuant never see them.
    """
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, name))
    if layers is None:
        return config
    templates = [e for e in config["quant_cfg"]
                 if e.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "parent_class" not in e]
    scoped: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        if any(c in layer for c in "*?[]"):
            raise ValueError(f"layer name {layer!r} has a wildcard character ModelOpt would expand")
        scoped += [{**copy.deepcopy(e), "quantizer_name": f"{layer}.{e['quantizer_name'][1:]}"} for e in templates]
    config["quant_cfg"] = scoped
    return config


def _code_bits(num_bits: int | tuple[int, int]) -> int:
    """Bits per code: an integer format's ``num_bits``, a float format ``(E, M)``'s 1 + E + M."""
    return num_bits if isinstance(num_bits, int) else 1 + num_bits[0] + num_bits[1]


def modelopt_weight_bytes(weight: torch.Tensor, quantizer: Any) -> int:
    """Bytes ModelOpt's export writes for a weight under its (enabled) weight quantizer:

    * codes: ``ceil(numel * bits / 8)`` (int8 one byte each; int4 and NVFP4 two per byte);
    * static scales (int8 per channel, int4 per block): one float32 ``weight_scale`` per entry of the
      quantizer's ``amax`` — the export writes ``amax.float() / maxbound`` — so one per output channel,
      or per block of 128 along the last dimension (a whole row when it is shorter; for a Conv2d
      weight the last dimension is the kernel width, so one scale per kernel row: int4 on a 3x3
      convolution takes 0.5 + 4/3 bytes per weight);
    * dynamic block scales (NVFP4, MXFP4): one 8-bit scale per block (E4M3 or E8M0), plus one float32
      ``weight_scale_2`` for E4M3 block scales;
    * a SequentialQuantizer (W4A8 AWQ: int4 then fp8): the first one's codes and scales, plus the
      float32 ``weight_scale_2`` of the second.
    """
    sequential = isinstance(quantizer, nn.Sequential)
    first = quantizer[0] if sequential else quantizer
    total = math.ceil(weight.numel() * _code_bits(first.num_bits) / 8)
    blocks = first.block_sizes or {}
    if blocks.get("type") == "dynamic":
        size = blocks[-1]
        rows = weight.numel() // weight.shape[-1]
        total += rows * math.ceil(weight.shape[-1] / size)  # one 8-bit block scale
        if tuple(blocks.get("scale_bits", ())) == (4, 3):
            total += 4  # weight_scale_2 (float32, per tensor)
    elif first.amax is not None:
        total += first.amax.numel() * 4
    if sequential and len(quantizer) > 1 and _enabled(quantizer[-1]):  # weight_scale_2 (float32), per tensor
        total += (1 if quantizer[-1].amax is None else quantizer[-1].amax.numel()) * 4  # (dynamic on a Conv2d)
    return total


def modelopt_module_bytes(module: nn.Module) -> int:
    """Bytes one module (its own parameters and buffers, not its children's) stores once exported:
    a weight with an enabled weight quantizer at :func:`modelopt_weight_bytes`, everything else at
    its own dtype; plus what the export adds from its quantizers — a quantized layer's float32
    ``input_scale`` (per tensor) when its input quantizer is calibrated, the AWQ/SmoothQuant ``pre_quant_scale`` (one per input channel, at
    its own dtype: float32 here) and SVDQuant's low-rank factors (at their dtype). The quantizers'
    calibration buffers (``_amax``) are not written."""
    weight_quantizer = getattr(module, "weight_quantizer", None)
    packed = _enabled(weight_quantizer) and isinstance(getattr(module, "weight", None), torch.Tensor)
    total = 0
    tensors = [*module._parameters.items(),
               *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set)]
    for name, tensor in tensors:
        if tensor is None:
            continue
        total += modelopt_weight_bytes(tensor, weight_quantizer) if packed and name == "weight" else (
            tensor.numel() * tensor.element_size())
    input_quantizer = getattr(module, "input_quantizer", None)
    if packed and _enabled(input_quantizer) and getattr(input_quantizer, "amax", None) is not None:
        total += input_quantizer.amax.numel() * 4  # (the export writes none for a module with float weights)
    pre_quant_scale = getattr(input_quantizer, "_pre_quant_scale", None)
    if pre_quant_scale is not None:
        total += pre_quant_scale.numel() * pre_quant_scale.element_size()
    if packed:
        for factor in ("svdquant_lora_a", "svdquant_lora_b"):
            t = getattr(weight_quantizer, factor, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def modelopt_stored_bytes(denoiser: nn.Module) -> int:
    """Bytes a ModelOpt-quantized (fake-quantized) model stores as ModelOpt exports it
    (``export_hf_checkpoint``: packed codes and scales instead of the float weights of its
    quantized layers, quantizer state other than the exported scales dropped).

    Every enabled weight quantizer is counted packed, Conv2d included. ModelOpt 0.47's export packs
    only Linear layers (it writes a QuantConv2d's weight in float) and refuses int4 rows that its
    block of 128 does not divide (``_validate_int4_block_size``); the figure here is what the
    quantized model's codes and scales take, as the fake quantizers define them.
    """
    quantizers = _quantizer_types()
    total = 0
    for module in denoiser.modules():
        if quantizers and isinstance(module, quantizers):
            continue
        total += modelopt_module_bytes(module)
    return total


def modelopt(config_name: str, scope: str = "default") -> Peer:
    """``mtq.quantize(denoiser, config, forward_loop)`` with the calibration passes diffq runs;
    ``scope="diffq"``: only diffq's layers (:func:`modelopt_config` with :func:`diffq_scope`)."""
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            import modelopt.torch.quantization as mtq

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            config = modelopt_config(config_name, diffq_scope(denoiser) if scope == "diffq" else None)
            quantized = mtq.quantize(denoiser, config, lambda _model: _calibration_passes(pipe, ctx))
            if quantized is not denoiser:
                raise RuntimeError("mtq.quantize returned another module than the pipeline's denoiser")
            return modelopt_stored_bytes(denoiser)

        return apply

    return make


# --- SDNQ --------------------------------------------------------------------------------------------


def sdnq_options(denoiser: nn.Module, scope: str = "default") -> dict[str, Any]:
    """``sdnq_post_load_quant`` options for a scope. ``default``: SDNQ's own (its skip keys, layers
    of at least 16384 weights and 32 input channels, no convolutions). ``diffq``: exactly diffq's
    layers, Conv2d included (``quant_conv=True``): no skip keys, no size minimums, every other
    module with a weight listed by its exact parameter name in ``modules_to_not_convert``."""
    if scope == "default":
        return {}
    keep = set(diffq_scope(denoiser))
    others = [f"{name}.weight" for name, module in denoiser.named_modules()
              if name not in keep and isinstance(getattr(module, "weight", None), torch.Tensor)]
    return dict(quant_conv=True, add_skip_keys=False, minimum_allowed_numel=0, minimum_allowed_channel_size=0,
                modules_to_not_convert=others)


def sdnq(weights: str, svd: bool = False, scope: str = "default") -> Peer:
    """SDNQ's post-load quantization with ``weights_dtype=weights`` (``use_svd``: its SVDQuant branch at
    its default rank, 32); weight-only, no calibration."""
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            from sdnq import sdnq_post_load_quant

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            quantized = sdnq_post_load_quant(denoiser, weights_dtype=weights, use_svd=svd,
                                             **sdnq_options(denoiser, scope))
            if quantized is not denoiser:
                raise RuntimeError("sdnq_post_load_quant returned another module than the pipeline's denoiser")
            return stored_bytes(denoiser)

        return apply

    return make


# --- the registry ------------------------------------------------------------------------------------

SDNQ_CONFIGS = {"int8": ("int8", False), "uint4": ("uint4", False), "uint4-svd": ("uint4", True)}

PEERS: dict[str, Peer] = {
    "quanto-w8a8": quanto("qint8", "qint8"),
    "quanto-w8a16": quanto("qint8"),
    "quanto-w4a16": quanto("qint4"),
    "torchao-w8a8": torchao(_int8_dynamic),
    "torchao-w8a16": torchao(_int8_weight_only),
    "torchao-w4a16": torchao(_int4_weight_only),
    "torchao-w4a16-intx": torchao(_intx4_weight_only),
    **{f"modelopt-{k}{s}": modelopt(v, "diffq" if s else "default")
       for k, v in MODELOPT_CONFIGS.items() for s in ("", "@diffq")},
    **{f"sdnq-{k}{s}": sdnq(w, svd, "diffq" if s else "default")
       for k, (w, svd) in SDNQ_CONFIGS.items() for s in ("", "@diffq")},
}
NEW_PEERS = [name for name in PEERS if name.startswith(("modelopt-", "sdnq-"))]
DEFAULT_PEERS = ["quanto-w8a8", "quanto-w4a16", "torchao-w8a8", "torchao-w8a16", "torchao-w4a16",
                 "torchao-w4a16-intx", *NEW_PEERS]
DEPRECATED = {"quanto": "optimum-quanto is deprecated in diffusers (since 2026-03)"}


def library(method: str) -> str:
    if method == "fp":
        return "–"
    return method.split("-")[0] if method in PEERS else "diffq"


def scope_of(method: str) -> str:
    """``diffq`` for a peer at diffq's layer scope, ``default`` for a peer's own, ``–`` for diffq/fp."""
    if method not in PEERS:
        return "–"
    return "diffq" if method.endswith("@diffq") else "default"
