"""Tiny offline diffusers pipelines with random weights, for tests.

Each builder seeds torch itself, so the same seed gives the same weights. The models are shaped like their
full-size versions (same blocks, same kinds of layers) but a few hundred kilobytes in size. Linear layers take
inputs whose width is a multiple of 64 wherever the architecture allows (so 4-bit groups of 64 apply) and
convolutions have multiples of 32 channels apart from the latent/pixel ends.

    pipe = tiny_sd_pipeline()
    images = run_tiny(pipe, TINY_PROMPTS[0])        # float32 numpy array (1, 32, 32, 3) in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "TINY_BUILDERS",
    "TINY_CALL_KWARGS",
    "TINY_IMAGE_SIZE",
    "TINY_PROMPTS",
    "run_tiny",
    "tiny_call_kwargs",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
]

TINY_PROMPTS: list[str] = [
    "a photo of a red cat sitting on a wooden table",
    "a watercolor painting of mountains at sunset",
    "a handwritten digit 7",
]

TINY_IMAGE_SIZE = 32  # pixels; every tiny VAE downsamples by 2, so latents are 16 x 16

_T5_MAX_LENGTH = 32
_CLIP_MAX_LENGTH = 77

# Call arguments per pipeline class, on top of prompt / steps / generator / output_type.
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE, "guidance_scale": 7.5},
    "PixArtAlphaPipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,  # binning only knows 256/512/1024 px models
        "clean_caption": False,  # needs bs4 and ftfy, and tests should not depend on them
        "max_sequence_length": _T5_MAX_LENGTH,
    },
    "FluxPipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "max_sequence_length": _T5_MAX_LENGTH,
    },
    "StableDiffusion3Pipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "guidance_scale": 5.0,
        "max_sequence_length": _T5_MAX_LENGTH,
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def _tiny_vae(latent_channels: int = 4, flow: bool = False) -> AutoencoderKL:
    """Two-level AutoencoderKL (downsampling 2x) with 32/64 channels.

    `flow=True` gives the SD3/Flux variant: no quant convs and a latent shift.
    """
    extra = {
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.0609,
        "scaling_factor": 1.5035,
    }
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
        **(extra if flow else {}),
    )


def _tiny_clip_config(hidden_size: int = 64, projection_dim: int | None = None) -> CLIPTextConfig:
    """Two-layer CLIP text config over the real CLIP vocabulary (ids from `build_clip_tokenizer`)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim or hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


def _tiny_t5(vocab_size: int, d_model: int = 64) -> T5EncoderModel:
    """Two-layer T5 encoder (gated GELU like T5 v1.1)."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        num_heads=d_model // 16,
        d_ff=2 * d_model,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Put the modules in eval mode and silence the progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------------


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.x/2.x layout: cross-attention UNet (64/128 channels), CLIP text encoder, DDIM."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),  # diffusers' UNet reads this as heads per block: 32 channels per head
        norm_num_groups=32,
        use_linear_projection=True,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_tiny_clip_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(_CLIP_MAX_LENGTH),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-alpha layout: adaLN-single DiT (width 64, 2 blocks), T5 encoder, DDIM, learned sigma."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(model_max_length=_T5_MAX_LENGTH)
    transformer = PixArtTransformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        num_layers=2,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=64,
        caption_channels=64,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = _tiny_vae()
    text_encoder = _tiny_t5(len(tokenizer), d_model=64)
    scheduler = DDIMScheduler()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _finish(pipe)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Flux layout: one double-stream and one single-stream block (width 64), CLIP + T5, flow matching."""
    torch.manual_seed(seed)
    tokenizer_2 = build_t5_tokenizer(model_max_length=_T5_MAX_LENGTH)
    latent_channels = 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(latent_channels, flow=True),
        text_encoder=CLIPTextModel(_tiny_clip_config()),
        tokenizer=build_clip_tokenizer(_CLIP_MAX_LENGTH),
        text_encoder_2=_tiny_t5(len(tokenizer_2), d_model=64),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Stable Diffusion 3 layout: MMDiT (width 64, 2 blocks), two projected CLIP encoders + T5, flow matching.

    The two CLIP encoders are 64 wide, so their concatenated hidden states (128) fit in the T5 width (128).
    """
    torch.manual_seed(seed)
    tokenizer_3 = build_t5_tokenizer(model_max_length=_T5_MAX_LENGTH)
    latent_channels = 16
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=128,
        caption_projection_dim=64,
        pooled_projection_dim=128,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(latent_channels, flow=True),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_config()),
        tokenizer=build_clip_tokenizer(_CLIP_MAX_LENGTH),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config()),
        tokenizer_2=build_clip_tokenizer(_CLIP_MAX_LENGTH),
        text_encoder_3=_tiny_t5(len(tokenizer_3), d_model=128),
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


TINY_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd": tiny_sd_pipeline,
    "pixart": tiny_pixart_pipeline,
    "flux": tiny_flux_pipeline,
    "sd3": tiny_sd3_pipeline,
}


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def tiny_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """The `TINY_CALL_KWARGS` entry for `pipe`'s class or its nearest listed base class."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in TINY_CALL_KWARGS:
            return dict(TINY_CALL_KWARGS[cls.__name__])
    return {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}


@torch.no_grad()
def run_tiny(
    pipe: DiffusionPipeline,
    prompt: str | list[str] | None = None,
    steps: int = 2,
    seed: int = 0,
    **kwargs: Any,
) -> np.ndarray:
    """Run `pipe` for `steps` denoising steps with a seeded CPU generator.

    Returns float32 images of shape (batch, height, width, 3) in [0, 1]. `kwargs` override the per-class
    defaults in `TINY_CALL_KWARGS`.
    """
    call_kwargs = tiny_call_kwargs(pipe) | kwargs
    output = pipe(
        prompt=TINY_PROMPTS[0] if prompt is None else prompt,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **call_kwargs,
    )
    return np.asarray(output.images, dtype=np.float32)
