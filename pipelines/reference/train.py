"""Train the bundled reference models on scikit-learn's digits (CPU, fixed seeds, time-boxed).

    python -m diffq.pipelines.reference.train [--only sd|dit|classifier] [--out DIR] [--minutes M]

Writes ``DIR/classifier``, ``DIR/digits-sd`` and ``DIR/digits-dit`` (default DIR: the bundled
``weights/`` folder), each atomically. ``--minutes`` is the wall-time budget of each diffusion model.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffq.saving import write_folder

from .classifier import DigitClassifier, save_classifier
from .data import load_split, prompt_for, random_affine

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiffusionPipeline,
        PixArtTransformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_atomically(final: Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(folder)`` and put the folder in place as ``final``, replacing an earlier one whole
    (:func:`diffq.saving.write_folder`)."""
    write_folder(final, writer, overwrite=True)


# --------------------------------------------------------------------------------------------------
# classifier


def _classifier_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Geometric jitter plus blur, contrast and noise, so the classifier also reads generated digits."""
    x = random_affine(x, g, max_rotate_deg=12.0, scale=(0.85, 1.15), max_shift_px=3.0)
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    gain = 0.7 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return (x * gain + noise).clamp(0, 1)


@torch.no_grad()
def evaluate_classifier(model: DigitClassifier, split: str) -> float:
    """Accuracy of ``model`` on one data split."""
    model.eval()
    x, y = load_split(split)
    return float((model.predict(x) == y).float().mean())


def train_classifier(out: Path, seed: int = 0, epochs: int = 60, minutes: float = 8.0) -> dict:
    """Train the digit classifier on ``classifier_train`` for ``epochs`` (``minutes`` is only a safety cap)
    and save it to ``out/classifier``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("classifier_train")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 64
    steps_per_epoch = math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    start, loss = time.time(), torch.tensor(float("nan"))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            logits = model(_classifier_augment(x[idx], g))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            _log(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
        if time.time() - start > minutes * 60:
            _log(f"classifier: time budget reached after {epoch + 1} epochs")
            break
    elapsed = time.time() - start
    metrics = {
        "final_loss": round(loss.item(), 4),
        "accuracy_classifier_test": round(evaluate_classifier(model, "classifier_test"), 4),
        "accuracy_diffusion_split": round(evaluate_classifier(model, "diffusion"), 4),
        "train_seconds": round(elapsed, 1),
        "seed": seed,
    }
    model.eval()

    def writer(tmp: Path) -> None:
        save_classifier(model, tmp, {"metrics": metrics})

    write_atomically(out / "classifier", writer)
    # accuracy of the saved (fp16-rounded) weights, re-read from disk
    from .classifier import load_classifier

    saved = load_classifier(out / "classifier")
    metrics["accuracy_classifier_test_fp16"] = round(evaluate_classifier(saved, "classifier_test"), 4)
    config_file = out / "classifier" / "config.json"
    config = json.loads(config_file.read_text())
    config["metrics"] = metrics
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    _log(f"classifier: {metrics}")
    return metrics


# --------------------------------------------------------------------------------------------------
# shared: VAE, latents, prompts, EMA, the denoiser training loop

LATENT_SIZE = 8  # 32×32 images → 8×8×4 latents
DIT_LATENT_SIZE = LATENT_SIZE
DROP_PROMPT_P = 0.1  # classifier-free guidance dropout: this share of samples gets the empty prompt


def build_vae() -> AutoencoderKL:
    """A small AutoencoderKL: 3×32×32 images in [-1, 1] ↔ 4×8×8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        mid_block_add_attention=False,
    )


def _images_for_vae(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` in [0, 1] → ``[N, 3, H, W]`` in [-1, 1]."""
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def train_vae(
    minutes: float, seed: int = 0, batch: int = 64, kl_weight: float = 1e-4, min_steps: int = 300
) -> tuple[AutoencoderKL, dict]:
    """Train the VAE on the diffusion split (reconstruction + small KL) for ``minutes`` but at least
    ``min_steps`` steps (a floor for busy machines); set its ``scaling_factor``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, _ = load_split("diffusion")
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, step = time.time(), 0
    rec = kl = torch.tensor(float("nan"))
    budget = minutes * 60
    while time.time() - start < budget or step < min_steps:
        frac = min(1.0, (time.time() - start) / budget)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = _images_for_vae(random_affine(x[idx], g, 8.0, (0.9, 1.1), 2.0))
        posterior = vae.encode(xb).latent_dist
        out = vae.decode(posterior.sample(generator=g)).sample
        rec = F.mse_loss(out, xb) + 0.5 * F.l1_loss(out, xb)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            _log(f"vae step {step} rec {rec.item():.4f} kl {kl.item():.3f}")
    vae.eval()
    with torch.no_grad():
        xt, _ = load_split("classifier_test")
        xt = _images_for_vae(xt)
        posterior = vae.encode(xt).latent_dist
        test_mse = F.mse_loss(vae.decode(posterior.mean).sample, xt).item()
        std = posterior.sample(generator=g).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    metrics = {
        "steps": step,
        "train_seconds": round(time.time() - start, 1),
        "final_rec_loss": round(rec.item(), 5),
        "final_kl": round(kl.item(), 4),
        "test_mse": round(test_mse, 5),
        "scaling_factor": vae.config.scaling_factor,
    }
    _log(f"vae: {metrics}")
    return vae, metrics


class LatentDigits:
    """The diffusion split encoded once by the VAE (several augmented copies), sampled per step."""

    def __init__(self, vae: AutoencoderKL, copies: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        x, y = load_split("diffusion")
        means, stds = [], []
        with torch.no_grad():
            for c in range(copies):
                xc = x if c == 0 else random_affine(x, g, 8.0, (0.9, 1.1), 2.0)
                for i in range(0, len(xc), 256):
                    d = vae.encode(_images_for_vae(xc[i : i + 256])).latent_dist
                    means.append(d.mean)
                    stds.append(d.std)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.labels = y.repeat(copies)
        self.scale = float(vae.config.scaling_factor)

    def sample(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of scaled latents (sampled from their posteriors) and their digit labels."""
        idx = torch.randint(0, len(self.labels), (batch,), generator=g)
        eps = torch.randn(self.mean[idx].shape, generator=g)
        return (self.mean[idx] + self.std[idx] * eps) * self.scale, self.labels[idx]


def prompt_table() -> list[str]:
    """All training prompts: index ``digit * V + variant`` for the V templates, then the empty prompt last."""
    from .data import PROMPT_TEMPLATES

    return [prompt_for(d, v) for d in range(10) for v in range(len(PROMPT_TEMPLATES))] + [""]


def _sample_prompt_ids(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random phrasing per label; ``DROP_PROMPT_P`` of them replaced by the empty prompt."""
    from .data import PROMPT_TEMPLATES

    v = len(PROMPT_TEMPLATES)
    ids = labels * v + torch.randint(0, v, labels.shape, generator=g)
    drop = torch.rand(labels.shape, generator=g) < DROP_PROMPT_P
    return torch.where(drop, torch.full_like(ids, 10 * v), ids)


class EMA:
    """Exponential moving average of parameters with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.999) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def train_denoiser(
    name: str,
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    modules: list[torch.nn.Module],
    latents: LatentDigits,
    scheduler: DDPMScheduler,
    minutes: float,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    max_steps: int | None = None,
    min_snr_gamma: float | None = None,
    min_steps: int = 1000,
) -> dict:
    """Epsilon-prediction training of ``predict(noisy_latents, timesteps, prompt_ids)``, time-boxed.

    Learning rate: linear warm-up, then cosine decay to 10 % over the time budget (or exactly
    ``max_steps``). On a machine too busy for ``min_steps`` steps in the budget, training goes on (at the
    final learning rate) until ``min_steps``.
    ``min_snr_gamma`` weights each sample by ``min(SNR, gamma) / SNR`` (Min-SNR weighting, which
    speeds up transformer denoisers). The EMA of the weights is copied into ``modules`` at the end.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(params)
    for m in modules:
        m.train()
    alphas = scheduler.alphas_cumprod
    start, step, budget = time.time(), 0, minutes * 60
    losses: list[float] = []
    while True:
        elapsed = time.time() - start
        frac = step / max_steps if max_steps else elapsed / budget
        if frac >= 1.0 and (max_steps or step >= min_steps):
            break
        frac = min(frac, 1.0)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x0, labels = latents.sample(batch, g)
        prompt_ids = _sample_prompt_ids(labels, g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        per_sample = (predict(noisy, t, prompt_ids) - noise).pow(2).mean(dim=(1, 2, 3))
        if min_snr_gamma is not None:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            _log(f"{name} step {step} loss {sum(losses[-100:]) / 100:.4f} ({time.time() - start:.0f}s)")
    ema.copy_to_params()
    for m in modules:
        m.eval()
    tail = losses[-200:] or [float("nan")]
    return {"steps": step, "train_seconds": round(time.time() - start, 1), "final_loss": round(sum(tail) / len(tail), 4)}


def _training_scheduler(beta_schedule: str = "linear") -> DDPMScheduler:
    """1000-step DDPM noise schedule: ``"linear"`` (1e-4 → 0.02) or SD's ``"scaled_linear"`` (less noisy)."""
    from diffusers import DDPMScheduler

    betas = (1e-4, 0.02) if beta_schedule == "linear" else (0.00085, 0.012)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=betas[0],
                         beta_end=betas[1], prediction_type="epsilon")  # fmt: skip


def _inference_scheduler(train_sched: DDPMScheduler):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(train_sched.config, algorithm_type="dpmsolver++", solver_order=2)


def _get_vae(out: Path, minutes: float, seed: int, vae_dir: Path | None = None) -> tuple[AutoencoderKL, dict]:
    """The VAE in ``vae_dir`` if given, else the one of an already trained ``out/digits-sd`` (so both
    pipelines share it), else a freshly trained one."""
    from diffusers import AutoencoderKL

    for folder in (vae_dir, out / "digits-sd" / "vae"):
        if folder is not None and (Path(folder) / "config.json").is_file():
            _log(f"using the VAE in {folder}")
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
            info_file = Path(folder) / "train_info.json"
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            source = "trained before both pipelines" if folder == vae_dir else "reused from digits-sd"
            return vae, {**info, "source": source}
    return train_vae(minutes, seed)


def _finalize_folder(tmp: Path) -> None:
    """Make transformers' text encoders, stored in fp16, load as fp32 like the diffusers models."""
    config = tmp / "text_encoder" / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = "float32"
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_pipeline(pipe: DiffusionPipeline, final: Path, metadata: dict) -> None:
    """Save ``pipe`` with fp16 weights (loads back as fp32) into ``final`` atomically, plus training info."""
    import copy

    half = copy.deepcopy(pipe).to(torch.float16)

    def writer(tmp: Path) -> None:
        half.save_pretrained(tmp, safe_serialization=True)
        (tmp / "diffq_reference.json").write_text(json.dumps(metadata, indent=2) + "\n")
        _finalize_folder(tmp)

    write_atomically(final, writer)


# --------------------------------------------------------------------------------------------------
# digits-sd: AutoencoderKL + CLIPTextModel + UNet2DConditionModel


def build_clip_text_encoder(tokenizer) -> CLIPTextModel:
    """A two-layer CLIP text transformer (width 64) over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=64,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """A ~2.1 M-parameter conditional UNet over 4×8×8 latents: 64 channels at 8×8, 4×4 and 2×2,
    cross-attention at 4×4, 2×2 and in the middle block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 64, 64),
        layers_per_block=1,
        attention_head_dim=(2, 2, 2),  # diffusers' name for the number of heads: head size 32
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def train_sd(
    out: Path,
    minutes: float,
    seed: int = 0,
    vae_minutes: float = 2.0,
    max_steps: int | None = None,
    vae_dir: Path | None = None,
) -> dict:
    """Train ``digits-sd`` (the VAE unless ``vae_dir`` holds one, then UNet and text encoder jointly) and
    save it to ``out/digits-sd``. ``minutes`` covers the VAE too when it is trained here."""
    from diffusers import StableDiffusionPipeline

    from ..tokenizers import build_clip_tokenizer

    total_start = time.time()
    if vae_dir is not None:
        vae, vae_metrics = _get_vae(out, vae_minutes, seed, vae_dir)
    else:
        vae, vae_metrics = train_vae(vae_minutes, seed)
    latents = LatentDigits(vae, seed=seed)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_clip_text_encoder(tokenizer)
    unet = build_unet(text_encoder.config.hidden_size)
    prompt_ids = tokenizer(prompt_table(), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def predict(noisy: torch.Tensor, t: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(pid, return_inverse=True)
        states = text_encoder(prompt_ids[uniq])[0][inverse]
        return unet(noisy, t, encoder_hidden_states=states).sample

    sched = _training_scheduler()
    denoiser_minutes = max(0.5, minutes - (time.time() - total_start) / 60)
    metrics = train_denoiser("sd", predict, [unet, text_encoder], latents, sched, denoiser_minutes, seed,
                             max_steps=max_steps)  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_inference_scheduler(sched),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _finish("digits-sd", pipe, out, metrics, vae_metrics, total_start, seed)


# --------------------------------------------------------------------------------------------------
# digits-dit: AutoencoderKL + T5EncoderModel + PixArtTransformer2DModel


def build_t5_text_encoder(tokenizer) -> T5EncoderModel:
    """A two-layer T5 v1.1-style encoder (width 128, gated GELU) over the small tokenizer's vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def build_pixart(caption_channels: int, patch_size: int = 1, num_layers: int = 4) -> PixArtTransformer2DModel:
    """A small PixArt-α transformer over 4×8×8 latents (patch 1 → 64 tokens, width 128, two heads of 64).

    The caption projection is initialised to keep unit scale (diffusers' default init shrinks the text
    embeddings ~20×, which made cross-attention conditioning far too slow to learn in a CPU budget).
    """
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        sample_size=DIT_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        patch_size=patch_size,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=64,
        cross_attention_dim=128,
        caption_channels=caption_channels,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        activation_fn="gelu-approximate",
        attention_bias=True,
        num_embeds_ada_norm=1000,
        interpolation_scale=1,
        use_additional_conditions=False,
    )
    for linear in (model.caption_projection.linear_1, model.caption_projection.linear_2):
        torch.nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
        torch.nn.init.zeros_(linear.bias)
    return model


def t5_words() -> list[str]:
    """The T5 tokenizer's vocabulary: the library's default prompt words plus every prompt-template word."""
    from ..tokenizers import DEFAULT_T5_WORDS
    from .data import prompt_words

    return list(DEFAULT_T5_WORDS) + [w for w in prompt_words() if w.isalnum()]


def train_dit(
    out: Path,
    minutes: float,
    seed: int = 0,
    vae_minutes: float = 2.0,
    max_steps: int | None = None,
    vae_dir: Path | None = None,
    batch: int = 32,
    patch_size: int = 1,
    num_layers: int = 4,
) -> dict:
    """Train ``digits-dit`` (PixArt-α transformer and T5 encoder jointly) and save it to ``out/digits-dit``;
    the VAE comes from ``vae_dir`` or ``out/digits-sd``, or is trained here."""
    from diffusers import PixArtAlphaPipeline

    from ..tokenizers import build_t5_tokenizer

    total_start = time.time()
    vae, vae_metrics = _get_vae(out, vae_minutes, seed, vae_dir)
    latents = LatentDigits(vae, seed=seed)
    tokenizer = build_t5_tokenizer(t5_words())
    torch.manual_seed(seed)
    text_encoder = build_t5_text_encoder(tokenizer)
    transformer = build_pixart(text_encoder.config.d_model, patch_size, num_layers)
    # the pipeline lowercases prompts and masks padding, so a short padded length gives the same embeddings
    tok = tokenizer([p.lower().strip() for p in prompt_table()], padding="max_length", max_length=16,
                    truncation=True, return_tensors="pt")  # fmt: skip

    def predict(noisy: torch.Tensor, t: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(pid, return_inverse=True)
        mask = tok.attention_mask[uniq]
        states = text_encoder(tok.input_ids[uniq], attention_mask=mask)[0][inverse]
        return transformer(noisy, encoder_hidden_states=states, encoder_attention_mask=mask[inverse],
                           timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip

    sched = _training_scheduler("scaled_linear")
    denoiser_minutes = max(0.5, minutes - (time.time() - total_start) / 60)
    metrics = train_denoiser("dit", predict, [transformer, text_encoder], latents, sched, denoiser_minutes, seed,
                             batch=batch, lr=1e-3, max_steps=max_steps, min_snr_gamma=5.0)  # fmt: skip
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=_inference_scheduler(sched))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return _finish("digits-dit", pipe, out, metrics, vae_metrics, total_start, seed)


def _finish(
    name: str, pipe: DiffusionPipeline, out: Path, metrics: dict, vae_metrics: dict, total_start: float, seed: int
) -> dict:
    """Measure alignment (fp32 in memory, then the saved fp16 weights), save, and log."""
    from . import DEFAULT_CALL_KWARGS
    from .evaluate import alignment

    kwargs = DEFAULT_CALL_KWARGS[name]
    cls_dir = out / "classifier" if (out / "classifier" / "model.safetensors").is_file() else None
    fp32 = alignment(pipe, classifier_dir=cls_dir, **kwargs)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}  # fmt: skip
    info = {
        "name": name,
        "seed": seed,
        "denoiser": metrics,
        "vae": vae_metrics,
        "parameters": params,
        "total_train_seconds": round(time.time() - total_start, 1),
        "alignment_fp32": fp32,
        "call_kwargs": kwargs,
    }
    _save_pipeline(pipe, out / name, info)
    saved = alignment(out / name, classifier_dir=cls_dir, **kwargs)
    info["alignment_saved_fp16"] = saved
    (out / name / "diffq_reference.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"{name}: {json.dumps(info)}")
    return info


def _train_in_subprocess(kind: str, out: Path, minutes: float, seed: int, max_steps: int | None,
                         vae_dir: Path, threads: int) -> dict:  # fmt: skip
    """Worker entry point for training one pipeline in its own process."""
    torch.set_num_threads(threads)
    fn = train_sd if kind == "sd" else train_dit
    return fn(out, minutes, seed=seed, max_steps=max_steps, vae_dir=vae_dir)


def train_all(out: Path, minutes: float, seed: int = 0, threads: int = 2, max_steps: int | None = None,
              vae_minutes: float = 2.0) -> dict:  # fmt: skip
    """Classifier, then one VAE shared by both pipelines, then ``digits-sd`` and ``digits-dit`` side by
    side in two processes (one thread each: on a small shared CPU this beats two threads each in turn)."""
    import concurrent.futures
    import multiprocessing

    results: dict = {"classifier": train_classifier(out, seed=seed)}
    vae, vae_metrics = train_vae(vae_minutes, seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vae.", dir=out) as tmp:
        vae.save_pretrained(tmp)
        (Path(tmp) / "train_info.json").write_text(json.dumps(vae_metrics) + "\n")
        ctx = multiprocessing.get_context("spawn")
        per_worker = max(1, threads // 2)
        with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = {kind: pool.submit(_train_in_subprocess, kind, out, minutes, seed, max_steps, Path(tmp),
                                         per_worker)  # fmt: skip
                       for kind in ("sd", "dit")}  # fmt: skip
            results.update({f"digits-{kind}": f.result() for kind, f in futures.items()})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("sd", "dit", "classifier"), default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-time budget per diffusion model")
    parser.add_argument("--max-steps", type=int, default=None, help="fixed step count instead of the time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.only is None:
        train_all(args.out, args.minutes, seed=args.seed, threads=args.threads, max_steps=args.max_steps)
    elif args.only == "classifier":
        train_classifier(args.out, seed=args.seed)
    elif args.only == "sd":
        train_sd(args.out, args.minutes, seed=args.seed, max_steps=args.max_steps)
    else:
        train_dit(args.out, args.minutes, seed=args.seed, max_steps=args.max_steps)
    _log(f"done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
