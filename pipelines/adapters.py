"""Per-architecture knowledge: which module denoises, which layers stay 16-bit, which drive content.

An :class:`Adapter` is plain data plus a few queries. Patterns are ``fnmatch`` globs over the
qualified layer names of the denoiser (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``).

Layer groups (used by sensitivity analysis): *content* layers decide what is drawn — cross-attention
(the text path) and feed-forward — and *quality* layers decide how clean it looks (everything else).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from diffq.errors import UnsupportedTargetError

LayerGroup = Literal["content", "quality"]

DENOISER_ATTRIBUTES = ("unet", "transformer")

# Linear layers that read the timestep/conditioning embedding (AdaLN modulation, time projections)
# see few distinct inputs per step and steer every block: 16-bit by rule, in every architecture
# (``diffq.quantize(..., temporal_bits=8)`` quantizes their weights only).
_TEMPORAL = ("*time_emb_proj", "*norm1.linear", "*norm1_context.linear", "*norm.linear", "norm_out.linear")
TEMPORAL_REASON = "temporal modulation (reads the timestep embedding)"


@dataclass(frozen=True)
class Adapter:
    """What diffq needs to know about one denoiser architecture."""

    name: str
    denoiser_classes: tuple[str, ...]
    keep_full_precision: dict[str, str]  # pattern -> reason
    content_patterns: tuple[str, ...]
    notes: str = ""
    bos_patterns: tuple[str, ...] = ()  # cross-attention K/V projections fed by text states

    def bos_layers(self, names: list[str] | set[str]) -> set[str]:
        """The layers whose first input token is the text encoder's BOS (when it has one)."""
        return {n for n in names if any(fnmatchcase(n, p) for p in self.bos_patterns)}

    def concat_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """Layers whose input is a channel concatenation, with the channel where part two starts."""
        return unet_concat_splits(denoiser) if self.name == "unet" else {}

    def matches(self, denoiser: nn.Module) -> bool:
        return any(cls.__name__ in self.denoiser_classes for cls in type(denoiser).__mro__)

    def kept_reason(self, name: str) -> str | None:
        """Why a layer stays in 16-bit, or ``None`` if it is quantized."""
        for pattern, reason in self.keep_full_precision.items():
            if fnmatchcase(name, pattern):
                return reason
        return None

    def group_of(self, name: str) -> LayerGroup:
        return "content" if any(fnmatchcase(name, p) for p in self.content_patterns) else "quality"

    def temporal_layers(self, denoiser: nn.Module) -> dict[str, nn.Linear]:
        """The Linear layers kept in 16-bit because they read the timestep embedding."""
        _, kept = self.layers(denoiser)
        return {
            name: module for name, reason in kept.items()
            if reason == TEMPORAL_REASON and isinstance(module := denoiser.get_submodule(name), nn.Linear)
        }

    def layers(self, denoiser: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """``(quantizable layers, kept layers with reasons)`` among the denoiser's Linear/Conv2d."""
        quantizable: dict[str, nn.Module] = {}
        kept: dict[str, str] = {}
        for name, module in denoiser.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            reason = self.kept_reason(name)
            if reason is None and isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                reason = f"padding_mode={module.padding_mode!r} has no quantized kernel"
            if reason is None:
                quantizable[name] = module
            else:
                kept[name] = reason
        return quantizable, kept


def unet_concat_splits(unet: nn.Module) -> dict[str, int]:
    """UNet up-block ResNets see ``cat([hidden, skip], dim=1)``: their conv1/conv_shortcut inputs.

    The hidden part has the previous block's output channels (first ResNet of a block) or the
    block's own output channels (the others); the skip part follows.
    """
    splits: dict[str, int] = {}
    previous = unet.mid_block.resnets[-1].out_channels if getattr(unet, "mid_block", None) else None
    for b, block in enumerate(getattr(unet, "up_blocks", [])):
        for r, resnet in enumerate(getattr(block, "resnets", [])):
            hidden = previous if r == 0 else resnet.out_channels
            if hidden is not None and 0 < hidden < resnet.in_channels:
                splits[f"up_blocks.{b}.resnets.{r}.conv1"] = hidden
                if getattr(resnet, "conv_shortcut", None) is not None:
                    splits[f"up_blocks.{b}.resnets.{r}.conv_shortcut"] = hidden
        if getattr(block, "resnets", None):
            previous = block.resnets[-1].out_channels
    return splits


def _keep(
    first: tuple[str, ...], last: tuple[str, ...], embeddings: tuple[str, ...], modulation: tuple[str, ...] = ()
) -> dict[str, str]:
    """Keep rules; ``modulation``: the architecture's own temporal layers, matched before the others
    (e.g. adaLN-single's linear layer inside an embedding module that otherwise stays 16-bit)."""
    rules = dict.fromkeys(modulation, TEMPORAL_REASON)
    rules.update({p: "first layer" for p in first})
    rules.update({p: "last layer" for p in last})
    rules.update({p: "time/condition embedding" for p in embeddings})
    rules.update(dict.fromkeys(_TEMPORAL, TEMPORAL_REASON))
    return rules


UNET = Adapter(
    name="unet",
    denoiser_classes=("UNet2DConditionModel",),
    keep_full_precision=_keep(
        first=("conv_in",),
        last=("conv_out",),
        embeddings=("time_embedding.*", "add_embedding.*", "class_embedding.*", "encoder_hid_proj.*"),
    ),
    content_patterns=("*attn2.*", "*.ff.*"),
    bos_patterns=("*attn2.to_k", "*attn2.to_v"),
    notes="SD 1.x/2.x and SDXL UNets: conv_in/conv_out, the time and added-condition embeddings and "
    "every ResNet time_emb_proj stay 16-bit; cross-attention (attn2) and feed-forward are content layers. "
    "Up-block ResNets get one activation scale per half of their skip concatenation; attn2 key/value "
    "projections compute the CLIP BOS token in full precision.",
)

PIXART = Adapter(
    name="pixart",
    denoiser_classes=("PixArtTransformer2DModel",),
    keep_full_precision=_keep(
        first=("pos_embed.proj",),
        last=("proj_out",),
        embeddings=("adaln_single.*", "caption_projection.*"),
        modulation=("adaln_single.linear",),
    ),
    content_patterns=("*attn2.*", "*.ff.*"),
    bos_patterns=("*attn2.to_k", "*attn2.to_v"),
    notes="PixArt-α/Σ: patch embedding, proj_out, adaLN-single (its timestep embedder, and the linear "
    "layer that makes every block's modulation) and caption projection stay 16-bit; "
    "cross-attention and feed-forward are content layers.",
)

DIT = Adapter(
    name="dit",
    denoiser_classes=("DiTTransformer2DModel", "Transformer2DModel"),
    keep_full_precision=_keep(
        first=("pos_embed.proj",),
        last=("proj_out", "proj_out_1", "proj_out_2"),
        embeddings=("*norm1.emb.*", "adaln_single.*", "caption_projection.*"),
        modulation=("adaln_single.linear",),
    ),
    content_patterns=("*attn2.*", "*.ff.*"),
    notes="Class-conditional DiT: patch embedding, output projections and the adaLN-Zero class/time "
    "embeddings stay 16-bit; feed-forward layers are content layers.",
)

MMDIT = Adapter(
    name="mmdit",
    denoiser_classes=("SD3Transformer2DModel", "FluxTransformer2DModel"),
    keep_full_precision=_keep(
        first=("pos_embed.proj", "x_embedder", "context_embedder"),
        last=("proj_out",),
        embeddings=("time_text_embed.*",),
    ),
    content_patterns=("*add_q_proj", "*add_k_proj", "*add_v_proj", "*to_add_out", "*ff_context.*", "*.ff.*"),
    notes="SD3 and Flux (joint-attention transformers): patch/latent and context embedders, proj_out, "
    "the time-text embedding and every adaLN modulation stay 16-bit; the text stream (add_*_proj, "
    "to_add_out, ff_context) and feed-forward layers are content layers.",
)

SANA = Adapter(
    name="sana",
    denoiser_classes=("SanaTransformer2DModel",),
    keep_full_precision={
        **_keep(
            first=("patch_embed.proj",),
            last=("proj_out",),
            embeddings=("time_embed.*", "caption_projection.*"),
            modulation=("time_embed.linear",),
        ),
        "*ff.conv_depth": "depthwise 3x3 convolution (9 weights per channel, no matrix multiply to speed up)",
    },
    content_patterns=("*attn2.*", "*.ff.*"),
    bos_patterns=("*attn2.to_k", "*attn2.to_v"),
    notes="Sana (linear-attention DiT with Mix-FFN): patch embedding, proj_out, the adaLN-single time "
    "embedding (with its guidance embedder in Sana-Sprint) and the caption projection stay 16-bit, and so "
    "does the depthwise convolution of each Mix-FFN; cross-attention and the Mix-FFN's pointwise convolutions "
    "are content layers, and attn2 key/value projections compute Gemma's BOS token in full precision.",
)

WAN = Adapter(
    name="wan",
    denoiser_classes=("WanTransformer3DModel",),
    keep_full_precision=_keep(
        first=("patch_embedding",),
        last=("proj_out",),
        embeddings=("condition_embedder.*",),
        modulation=("condition_embedder.time_proj",),
    ),
    content_patterns=("*attn2.*", "*.ffn.*"),
    bos_patterns=("*attn2.to_k", "*attn2.to_v"),
    notes="Wan video transformers: the 3D patch embedding (a Conv3d, never quantized), proj_out and the "
    "condition embedder (time embedding, the time projection that feeds every block's modulation, the "
    "text and image embedders) stay 16-bit; cross-attention and feed-forward (ffn) are content layers.",
)

ADAPTERS: list[Adapter] = [UNET, PIXART, DIT, MMDIT, SANA, WAN]


def register_adapter(adapter: Adapter) -> None:
    """Teach diffq a new denoiser architecture (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def adapter_for(denoiser: nn.Module) -> Adapter:
    """The adapter of a denoiser module."""
    for adapter in ADAPTERS:
        if adapter.matches(denoiser):
            return adapter
    known = sorted({c for a in ADAPTERS for c in a.denoiser_classes})
    raise UnsupportedTargetError(
        f"diffq has no adapter for {type(denoiser).__name__}; supported denoisers: {', '.join(known)}. "
        "Register one with diffq.pipelines.register_adapter(Adapter(...))."
    )


def denoiser_of(pipe) -> nn.Module:
    """The denoiser of a diffusers pipeline (its ``unet`` or ``transformer``)."""
    for attr in DENOISER_ATTRIBUTES:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedTargetError(
        f"{type(pipe).__name__} has no denoiser (no 'unet' or 'transformer' component), so there is "
        "nothing for diffq to quantize. Pass a text-to-image or video diffusion pipeline."
    )


def denoiser_name(pipe) -> str:
    """The component name of the pipeline's denoiser (``"unet"`` or ``"transformer"``)."""
    for attr in DENOISER_ATTRIBUTES:
        if isinstance(getattr(pipe, attr, None), nn.Module):
            return attr
    denoiser_of(pipe)  # raises the explanatory error
    raise AssertionError
