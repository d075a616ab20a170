"""Tiny offline diffusers pipelines with random weights, for tests.

Each builder seeds torch itself, so the same seed gives the same weights. The models are shaped like their
full-size versions (same blocks, same kinds of layers) but a few hundred kilobytes in size. Linear layers take
inputs whose width is a multiple of 64 wherever the architecture allows (so 4-bit groups of 64 apply) and
convolutions have multiples of 32 channels apart from the latent/pixel ends.

    pipe = tiny_sd_pipeline()
    images = run_tiny(pipe, TINY_PROMPTS[0])        # float32 numpy array (1, 32, 32, 3) in [0, 1]

`TINY_BUILDERS` holds the text-to-image pipelines (prompt in, one image per prompt out). The class-conditional
DiT (`TINY_CLASS_BUILDERS`: its classes are named after `TINY_PROMPTS`, so `run_tiny` maps a prompt to its class
label) and the video pipeline (`TINY_VIDEO_BUILDERS`: `run_tiny` returns its frames flattened into the image
batch) are listed apart; `TINY_ARCHITECTURES` holds them all. `tiny_sdxl_turbo_pipeline` is SDXL set up for
SDXL-Turbo's single-step sampling (`TINY_TURBO_CALL_KWARGS`, one step).
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .tokenizers import DEFAULT_T5_WORDS, build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_BUILDERS",
    "TINY_CALL_KWARGS",
    "TINY_CLASS_BUILDERS",
    "TINY_CLASS_NAMES",
    "TINY_IMAGE_SIZE",
    "TINY_NUM_FRAMES",
    "TINY_PROMPTS",
    "TINY_TURBO_CALL_KWARGS",
    "TINY_VIDEO_BUILDERS",
    "build_gemma_tokenizer",
    "is_class_conditional",
    "run_tiny",
    "tiny_call_kwargs",
    "tiny_dit_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_pixart_sigma_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_turbo_pipeline",
    "tiny_wan_pipeline",
]

TINY_PROMPTS: list[str] = [
    "a photo of a red cat sitting on a wooden table",
    "a watercolor painting of mountains at sunset",
    "a handwritten digit 7",
]

TINY_IMAGE_SIZE = 32  # pixels; every tiny VAE downsamples by 2, so latents are 16 x 16

_T5_MAX_LENGTH = 32
_CLIP_MAX_LENGTH = 77
_GEMMA_MAX_LENGTH = 32

TINY_NUM_FRAMES = 3  # frames of the tiny video pipeline: 2 latent frames (its VAE halves time, keeping frame 0)

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
    "StableDiffusionXLPipeline": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE, "guidance_scale": 5.0},
    "PixArtSigmaPipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
        "clean_caption": False,
        "max_sequence_length": _T5_MAX_LENGTH,
    },
    "SanaPipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,  # binning would turn 32 px into 512 px
        "clean_caption": False,
        "complex_human_instruction": None,  # Sana prepends a long instruction to every prompt by default
        "max_sequence_length": _GEMMA_MAX_LENGTH,
    },
    "DiTPipeline": {"guidance_scale": 4.0},  # no height/width: the image size is the transformer's sample size
    "WanPipeline": {
        "height": TINY_IMAGE_SIZE,
        "width": TINY_IMAGE_SIZE,
        "num_frames": TINY_NUM_FRAMES,
        "guidance_scale": 5.0,
        "max_sequence_length": _T5_MAX_LENGTH,
    },
}

# SDXL-Turbo samples in one step without guidance; use with `run_tiny(pipe, steps=1, **TINY_TURBO_CALL_KWARGS)`.
TINY_TURBO_CALL_KWARGS: dict[str, Any] = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE, "guidance_scale": 0.0}


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


def _tiny_umt5(vocab_size: int, d_model: int = 64) -> UMT5EncoderModel:
    """Two-layer UMT5 encoder (Wan's text encoder family: relative attention bias in every layer)."""
    config = UMT5Config(
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
    return UMT5EncoderModel(config)


_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma


def build_gemma_tokenizer(model_max_length: int = _GEMMA_MAX_LENGTH) -> GemmaTokenizer:
    """A small Gemma BPE tokenizer built in memory: Gemma's class, special ids and BOS, a tiny vocabulary.

    Pieces are Gemma's specials, 256 byte-fallback tokens, single ASCII characters, and the words of
    `DEFAULT_T5_WORDS` preceded by "▁" (merged letter by letter, so any other text falls back to characters
    and bytes). It adds `<bos>` to every sequence like the real tokenizer and round-trips through
    `save_pretrained`.
    """
    vocab = {token: i for i, token in enumerate(_GEMMA_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in DEFAULT_T5_WORDS:
        piece = "▁"
        for char in word:
            if piece + char not in vocab:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
            piece += char
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


def _tiny_gemma2(vocab_size: int, hidden_size: int = 64) -> Gemma2Model:
    """Two-layer Gemma 2 decoder (Sana's text encoder): grouped-query attention, 32-wide heads."""
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",  # what Gemma 2 recommends (attention logit soft-capping)
    )
    return Gemma2Model(config)


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


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 2.x layout: the SD UNet with upcast attention, an OpenCLIP-style (GELU) text encoder
    and a v-prediction DDIM scheduler."""
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
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        upcast_attention=True,
    )
    text_config = _tiny_clip_config()
    text_config.hidden_act = "gelu"  # OpenCLIP ViT-H/14, unlike OpenAI CLIP's quick_gelu
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=build_clip_tokenizer(_CLIP_MAX_LENGTH),  # pads with "!" like the SD 2 tokenizer
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def _tiny_sdxl(seed: int, scheduler: Any) -> StableDiffusionXLPipeline:
    """The SDXL components (UNet with text-time added conditions, two CLIP encoders) around `scheduler`."""
    torch.manual_seed(seed)
    clip_width = 64
    time_embed_dim = 32  # 6 size/crop ids x 32 + pooled text (64) = 256 added-condition inputs
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * clip_width,  # both encoders' penultimate hidden states, concatenated
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=clip_width + 6 * time_embed_dim,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_clip_config(clip_width)),
        tokenizer=build_clip_tokenizer(_CLIP_MAX_LENGTH, pad_token="<|endoftext|>"),  # OpenAI CLIP pads with EOS
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(clip_width, projection_dim=clip_width)),
        tokenizer_2=build_clip_tokenizer(_CLIP_MAX_LENGTH),  # OpenCLIP bigG pads with "!"
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout: UNet (64/128 channels, attention in the lower block only) with text-time added-condition
    embeddings, CLIP + projected CLIP text encoders (cross-attention width 128), Euler.

    One transformer layer per attention block (SDXL stacks 2 and 10 of the same layers) keeps the UNet small."""
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return _tiny_sdxl(seed, scheduler)


def tiny_sdxl_turbo_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-Turbo: the SDXL layout with an Euler-ancestral scheduler on "trailing" timesteps, so one step
    starts from pure noise (t = 999). Sample with `steps=1` and `TINY_TURBO_CALL_KWARGS` (no guidance)."""
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="trailing"
    )
    return _tiny_sdxl(seed, scheduler)


def tiny_pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Sigma layout: the adaLN-single DiT of PixArt (width 64, 2 blocks), T5 encoder, DPM-Solver."""
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
        interpolation_scale=1,
        use_additional_conditions=False,  # Sigma has no resolution/aspect-ratio embeddings
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5(len(tokenizer), d_model=64),
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe)


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """Sana layout: linear-attention DiT with Mix-FFN (width 64, 2 blocks), Gemma 2 text encoder with a Gemma
    tokenizer, DC-AE autoencoder (downsampling 2x), flow-matching DPM-Solver."""
    torch.manual_seed(seed)
    tokenizer = build_gemma_tokenizer(_GEMMA_MAX_LENGTH)
    latent_channels = 16
    transformer = SanaTransformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        num_cross_attention_heads=2,
        cross_attention_head_dim=32,
        cross_attention_dim=64,
        caption_channels=64,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=32,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(32, 64),
        decoder_block_out_channels=(32, 64),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_gemma2(len(tokenizer)),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


# The tiny DiT's classes are named after the tiny prompts, so `run_tiny(pipe, TINY_PROMPTS[0])` works for it too.
TINY_CLASS_NAMES: dict[int, str] = dict(enumerate(TINY_PROMPTS))


def tiny_dit_pipeline(seed: int = 0) -> DiTPipeline:
    """DiT layout: class-conditional adaLN-Zero transformer (width 64, 2 blocks, 1000 classes + the null class
    DiTPipeline uses for guidance), learned sigma, DDIM. `id2label` (`TINY_CLASS_NAMES`) is in its config."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=32,
        num_embeds_ada_norm=1000,
    )
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=scheduler, id2label=TINY_CLASS_NAMES)
    pipe.register_to_config(id2label=TINY_CLASS_NAMES)  # DiTPipeline does not, and save_pretrained would drop it
    return _finish(pipe)


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video layout: 3D-patch transformer (width 64, 2 blocks), UMT5 encoder, causal 3D VAE
    that downsamples 2x in space and time (`TINY_NUM_FRAMES` = 3 frames -> 2 latent frames), UniPC flow."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(model_max_length=_T5_MAX_LENGTH)
    latent_channels = 16
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=64,
        freq_dim=256,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=32,
        z_dim=latent_channels,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        scale_factor_spatial=2,
        scale_factor_temporal=2,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_umt5(len(tokenizer), d_model=64),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


TINY_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd": tiny_sd_pipeline,
    "pixart": tiny_pixart_pipeline,
    "flux": tiny_flux_pipeline,
    "sd3": tiny_sd3_pipeline,
    "sd2": tiny_sd2_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "pixart-sigma": tiny_pixart_sigma_pipeline,
    "sana": tiny_sana_pipeline,
}

# Class-conditional pipelines: `class_labels` instead of a prompt (`run_tiny` maps prompts to class names).
TINY_CLASS_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {"dit": tiny_dit_pipeline}

# Video pipelines: `run_tiny` returns their `TINY_NUM_FRAMES` frames per prompt flattened into the batch.
TINY_VIDEO_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {"wan": tiny_wan_pipeline}

# Every architecture family, one tiny pipeline each (SDXL-Turbo is SDXL with another scheduler: not listed).
TINY_ARCHITECTURES: dict[str, Callable[[int], DiffusionPipeline]] = {
    **TINY_BUILDERS,
    **TINY_CLASS_BUILDERS,
    **TINY_VIDEO_BUILDERS,
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


def is_class_conditional(pipe: DiffusionPipeline) -> bool:
    """Whether `pipe` is called with `class_labels` instead of a prompt (DiT)."""
    params = inspect.signature(type(pipe).__call__).parameters
    return "class_labels" in params and "prompt" not in params


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
    defaults in `TINY_CALL_KWARGS`. A class-conditional pipeline (DiT) gets `class_labels=` from `kwargs`, or
    else the ids of the class names given as `prompt` (`pipe.get_label_ids`). A video pipeline's frames are
    flattened into the batch: (batch * frames, height, width, 3), prompt-major.
    """
    call_kwargs = tiny_call_kwargs(pipe) | kwargs
    prompt = TINY_PROMPTS[0] if prompt is None else prompt
    if is_class_conditional(pipe):
        if "class_labels" not in call_kwargs:
            call_kwargs["class_labels"] = pipe.get_label_ids([prompt] if isinstance(prompt, str) else list(prompt))
    else:
        call_kwargs["prompt"] = prompt
    output = pipe(
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **call_kwargs,
    )
    frames = getattr(output, "frames", None)
    if frames is not None:  # video: (batch, frames, height, width, 3)
        frames = np.asarray(frames, dtype=np.float32)
        return frames.reshape(-1, *frames.shape[2:])
    return np.asarray(output.images, dtype=np.float32)
