"""Text-image agreement: CLIP score (open_clip, any architecture) and the offline digit alignment.

CLIP weights come from a local file or an open_clip pretrained tag that is already in the local
cache (Hugging Face hub cache or ``~/.cache/clip``). Resolving a tag never downloads: a tag that
is not cached raises :class:`MissingWeightsError` at once instead of waiting on the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffq.metrics.errors import MissingWeightsError
from diffq.metrics.images import batches, to_rgb

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def resolve_clip_weights(model_name: str, pretrained: str) -> tuple[str, dict]:
    """Local checkpoint path for ``pretrained`` (a file or a cached tag) and the tag's settings.

    Returns ``(path, cfg)`` where ``cfg`` holds the tag's preprocessing (``mean``, ``std``, ...)
    and ``quick_gelu``; it is empty for a plain file.
    """
    if os.path.isfile(pretrained):
        return pretrained, {}
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise MissingWeightsError(
            f"CLIP weights {pretrained!r} are neither a file nor an open_clip tag of {model_name!r} "
            f"(known tags: {', '.join(list_pretrained_tags_by_model(model_name)) or 'none'})."
        )
    for candidate in _cached_candidates(cfg):
        if candidate and os.path.isfile(candidate):
            return candidate, cfg
    raise MissingWeightsError(
        f"CLIP weights for {model_name}/{pretrained} are not in the local cache and diffq does not download "
        "them during evaluation; download the checkpoint once and pass its file path instead."
    )


def _cached_candidates(cfg: dict) -> list[str]:
    out: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(hub)  # "org/name/" names the repo's default checkpoint
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                out.append(found)
    url = cfg.get("url", "")
    if url:
        out.append(str(Path("~/.cache/clip").expanduser() / os.path.basename(url)))
    return out


class ClipScorer:
    """CLIP score ``100 * max(cos(image, text), 0)`` averaged over image-prompt pairs.

    ``model_name`` is any open_clip architecture (``"ViT-B-32"``, ``"local-dir:/path"``, ...);
    ``pretrained`` a checkpoint file or a locally cached tag (``None`` keeps random weights, for
    tests only).
    """

    def __init__(
        self, model_name: str, pretrained: str | None, *, device: str | torch.device = "cpu"
    ) -> None:
        import open_clip

        self.device = torch.device(device)
        kwargs: dict = {"pretrained_text": False}
        if pretrained is not None and not model_name.startswith(("hf-hub:", "local-dir:")):
            path, cfg = resolve_clip_weights(model_name, pretrained)
            kwargs["pretrained"] = path
            kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
            preprocess = {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}
            if preprocess:
                kwargs["force_preprocess_cfg"] = preprocess
        elif model_name.startswith("hf-hub:"):
            raise MissingWeightsError(
                f"{model_name!r} would be fetched from the Hugging Face hub; diffq evaluates offline. "
                "Save the model to a folder and use 'local-dir:/path/to/folder' instead."
            )
        self.model: nn.Module = open_clip.create_model(model_name, device=self.device, **kwargs).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = pp.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = to_rgb(images.float())
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """Per-pair CLIP scores ``[N]`` for images ``[N, C, H, W]`` in [0, 1] and ``N`` prompts."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        out = []
        for idx in batches(len(prompts), batch_size):
            img = self.model.encode_image(self._prepare(images[idx.start : idx.stop]))
            txt = self.model.encode_text(self.tokenizer(list(prompts[idx.start : idx.stop])).to(self.device))
            cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
            out.append(100.0 * cos.clamp(min=0).cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Mean CLIP score over the pairs."""
        return float(self.scores(images, prompts).mean())


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
) -> float:
    """Mean CLIP score of images against their prompts (builds a :class:`ClipScorer` once)."""
    return ClipScorer(model_name, pretrained, device=device)(images, prompts)


@torch.no_grad()
def predict_digits(images: torch.Tensor, classifier: nn.Module, *, batch_size: int = 256) -> torch.Tensor:
    """The classifier's digit for each image ``[N, C, H, W]`` in [0, 1], as a ``[N]`` long tensor."""
    was_training = classifier.training
    classifier.eval()
    param = next(classifier.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        preds = [
            classifier(images[idx.start : idx.stop].float().to(device)).argmax(dim=-1).cpu()
            for idx in batches(images.shape[0], batch_size)
        ]
    finally:
        classifier.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def alignment(images: torch.Tensor, digits: Sequence[int] | torch.Tensor, classifier: nn.Module) -> float:
    """Fraction of images the classifier labels with the prompted digit."""
    target = torch.as_tensor(
        list(digits) if not isinstance(digits, torch.Tensor) else digits, dtype=torch.long
    )
    if images.shape[0] != target.numel():
        raise ValueError(f"{images.shape[0]} images but {target.numel()} digits")
    if target.numel() == 0:
        raise ValueError("alignment needs at least one image")
    return float((predict_digits(images, classifier) == target.cpu()).double().mean())
