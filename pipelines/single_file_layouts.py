"""Write diffusers models back in the original single-file layouts that ``from_single_file`` reads.

The inverse of diffusers' converters in ``diffusers.loaders.single_file_utils``
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``, ``convert_flux_transformer_checkpoint_to_diffusers``): the
Stable Diffusion 1.x / SDXL checkpoint layout of the original LDM code (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*`` / ``conditioner.embedders.*``) and Black
Forest Labs' Flux transformer layout (``double_blocks.*``, ``single_blocks.*``, ``img_in``, ...).
The tests write the tiny pipelines this way and read them back through diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]

_UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_LAYERS = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _state(module: nn.Module) -> Tensors:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rename(rest: str, mapping: dict[str, str]) -> str:
    """``rest`` with its leading ``mapping`` key (e.g. ``norm1.weight`` -> ``in_layers.0.weight``) replaced."""
    for new, old in mapping.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_unet_state_dict(unet: nn.Module) -> Tensors:
    """A ``UNet2DConditionModel``'s weights in the LDM layout (``input_blocks``, ``middle_block``, ...)."""
    per_block = unet.config.layers_per_block
    up_attention = {int(k.split(".")[1]) for k in unet.state_dict() if k.startswith("up_blocks.") and ".attentions." in k}
    out: Tensors = {}
    for key, value in _state(unet).items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if parts[0] == "down_blocks":
                if kind == "downsamplers":  # the ".conv" of diffusers' Downsample2D is LDM's ".op"
                    new = f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{rest.split('.', 1)[1]}"
                else:
                    slot = 1 + block * (per_block + 1) + index
                    new = f"input_blocks.{slot}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                        else f"input_blocks.{slot}.1.{rest}"
            else:
                if kind == "upsamplers":
                    position = 2 if block in up_attention else 1
                    new = f"output_blocks.{block * (per_block + 1) + per_block}.{position}.{rest}"
                else:
                    slot = block * (per_block + 1) + index
                    new = f"output_blocks.{slot}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                        else f"output_blocks.{slot}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * index}.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                else f"middle_block.1.{rest}"
        else:
            new = _rename(key, _UNET_LAYERS)
        out[new] = value
    return out


def ldm_vae_state_dict(vae: nn.Module) -> Tensors:
    """An ``AutoencoderKL``'s weights in the LDM layout (``encoder.down.0.block.0``, ``mid.attn_1``, ...)."""
    levels = len(vae.config.up_block_types)
    out: Tensors = {}
    for key, value in _state(vae).items():
        side, _, rest = key.partition(".")
        parts = rest.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
            name = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] in ("downsamplers", "upsamplers"):
                new = f"{side}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.{'.'.join(parts[4:])}"
            else:
                tail = _rename(".".join(parts[4:]), {"conv_shortcut": "nin_shortcut"})
                new = f"{side}.{name}.{level}.block.{parts[3]}.{tail}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            tail = _rename(".".join(parts[3:]), {"conv_shortcut": "nin_shortcut"})
            new = f"{side}.mid.block_{int(parts[2]) + 1}.{tail}"
        elif parts[0] == "mid_block":  # attention: LDM stores its projections as 1x1 convolutions
            new = f"{side}.mid.attn_1.{_rename('.'.join(parts[3:]), _VAE_ATTENTION)}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif side in ("encoder", "decoder"):
            new = f"{side}.{_rename(rest, _VAE_LAYERS)}"
        else:
            new = key  # quant_conv, post_quant_conv
        out[new] = value
    return out


def ldm_clip_state_dict(text_encoder: nn.Module) -> Tensors:
    """A transformers ``CLIPTextModel``'s weights as LDM stores them (``text_model.*``)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in _state(text_encoder).items()}


def open_clip_state_dict(text_encoder: nn.Module) -> Tensors:
    """A ``CLIPTextModelWithProjection``'s weights in OpenCLIP's layout (SDXL's second text encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in _state(text_encoder).items()}
    out: Tensors = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    state.pop("embeddings.position_ids", None)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"], dim=0)
            for new, old in names.items():
                out[f"{dst}{old}.{kind}"] = state.pop(f"{src}{new}.{kind}")
    if state:
        raise ValueError(f"no OpenCLIP name for {sorted(state)}")
    return out


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_flux_state_dict(transformer: nn.Module) -> Tensors:
    """A ``FluxTransformer2DModel``'s weights in Black Forest Labs' layout (``double_blocks``, ``img_in``, ...)."""
    s = _state(transformer)
    out: Tensors = {}

    def take(new: str, old: str) -> None:
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in s:
                out[f"{new}.{kind}"] = s.pop(f"{old}.{kind}")

    def fuse(new: str, olds: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = torch.cat([s.pop(f"{old}.{kind}") for old in olds], dim=0)

    for name, old in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        take(f"{name}.in_layer", f"time_text_embed.{old}.linear_1")
        take(f"{name}.out_layer", f"time_text_embed.{old}.linear_2")
    take("txt_in", "context_embedder")
    take("img_in", "x_embedder")
    for i in range(transformer.config.num_layers):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        take(d + "img_mod.lin", b + "norm1.linear")
        take(d + "txt_mod.lin", b + "norm1_context.linear")
        fuse(d + "img_attn.qkv", [b + f"attn.to_{p}" for p in "qkv"])
        fuse(d + "txt_attn.qkv", [b + f"attn.add_{p}_proj" for p in "qkv"])
        for new, old in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                         ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{d}{new}.scale"] = s.pop(f"{b}{old}.weight")
        take(d + "img_mlp.0", b + "ff.net.0.proj")
        take(d + "img_mlp.2", b + "ff.net.2")
        take(d + "txt_mlp.0", b + "ff_context.net.0.proj")
        take(d + "txt_mlp.2", b + "ff_context.net.2")
        take(d + "img_attn.proj", b + "attn.to_out.0")
        take(d + "txt_attn.proj", b + "attn.to_add_out")
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        take(d + "modulation.lin", b + "norm.linear")
        fuse(d + "linear1", [b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"])
        out[d + "norm.query_norm.scale"] = s.pop(b + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = s.pop(b + "attn.norm_k.weight")
        take(d + "linear2", b + "proj_out")
    take("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):  # BFL's final AdaLN is (shift, scale); diffusers' is (scale, shift)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(s.pop(f"norm_out.linear.{kind}"))
    if s:
        raise ValueError(f"no Flux (BFL) name for {sorted(s)}")
    return out


def _prefixed(prefix: str, state: Tensors) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def sd_checkpoint(pipe: Any) -> Tensors:
    """A Stable Diffusion 1.x pipeline as one LDM (CompVis) checkpoint: UNet, VAE and CLIP text encoder."""
    return {**_prefixed("model.diffusion_model.", ldm_unet_state_dict(pipe.unet)),
            **_prefixed("first_stage_model.", ldm_vae_state_dict(pipe.vae)),
            **_prefixed("cond_stage_model.transformer.", ldm_clip_state_dict(pipe.text_encoder))}


def sdxl_checkpoint(pipe: Any) -> Tensors:
    """An SDXL pipeline as one checkpoint in Stability's layout (``conditioner.embedders.0/1``)."""
    return {**_prefixed("model.diffusion_model.", ldm_unet_state_dict(pipe.unet)),
            **_prefixed("first_stage_model.", ldm_vae_state_dict(pipe.vae)),
            **_prefixed("conditioner.embedders.0.transformer.", ldm_clip_state_dict(pipe.text_encoder)),
            **_prefixed("conditioner.embedders.1.model.", open_clip_state_dict(pipe.text_encoder_2))}


def write_checkpoint(state: Tensors, path: str | os.PathLike) -> None:
    """Save ``state`` as a ``.safetensors`` file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, os.fspath(path))


@contextmanager
def any_flux_width() -> Iterator[None]:
    """Let diffusers read BFL Flux files of any width, not only Flux.1's 3072.

    ``convert_flux_transformer_checkpoint_to_diffusers`` splits each single block's fused
    ``linear1`` at Flux.1's fixed widths (3072 x 3, 12288). Inside this context it is handed each
    fused part zero-padded to those widths and the parts are cut back afterwards, so diffusers'
    own key mapping still does the conversion of a tiny test transformer.
    """
    from diffusers.loaders import single_file_model
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers as convert,
    )

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    inner, mlp = 3072, 4 * 3072

    def padded(checkpoint: Tensors, **kwargs: Any) -> Tensors:
        checkpoint = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
        width = checkpoint["img_in.weight"].shape[0]
        singles = [k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k]
        for key in singles:
            parts = checkpoint[key].split([width] * 3 + [checkpoint[key].shape[0] - 3 * width], dim=0)
            checkpoint[key] = torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.ndim - 1) + (0, size - p.shape[0]))
                                         for p, size in zip(parts, (inner, inner, inner, mlp), strict=True)], dim=0)
        converted = convert(checkpoint, **kwargs)
        for key in [k for k in converted if k.startswith("single_transformer_blocks.")]:
            if key.split(".")[-2] in ("to_q", "to_k", "to_v"):
                converted[key] = converted[key][:width]
            elif ".proj_mlp." in key:
                converted[key] = converted[key][:4 * width]
        return converted

    saved = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = padded
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = saved
