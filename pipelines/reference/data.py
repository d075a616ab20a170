"""Real training data for the bundled reference models: scikit-learn's handwritten digits.

The 1,797 8×8 digits are split once, with a fixed seed and stratified by label, into

- ``"diffusion"`` (60 %): the only images the diffusion models are trained on;
- ``"classifier_train"`` (28 %): the digit classifier's training images;
- ``"classifier_test"`` (12 %): held out from every model, used to report the classifier's accuracy.

Images are upsampled to 32×32 (bilinear). Prompt templates name the digit in varied phrasings.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
"""Seed of the fixed data split (never change it: bundled weights and tests depend on it)."""

SPLITS = ("diffusion", "classifier_train", "classifier_test")
IMAGE_SIZE = 32

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {d}",
    "the number {w}, written by hand",
    "a drawing of the digit {d}",
    "{d}",
    "{w}",
    "the digit {w}",
    "a handwritten {w}",
    "number {d}",
    "a picture of the number {w}",
    "the digit {d}, handwritten",
)
"""Phrasings of a digit prompt; ``{d}`` is the numeral, ``{w}`` the English word."""


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1], ink is bright
    return images, digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Return the fixed, disjoint, label-stratified index sets of the three splits."""
    from sklearn.model_selection import train_test_split

    _, labels = _load_raw()
    idx = np.arange(len(labels))
    diffusion, rest = train_test_split(idx, train_size=0.6, random_state=SPLIT_SEED, stratify=labels)
    cls_train, cls_test = train_test_split(
        rest, train_size=0.7, random_state=SPLIT_SEED, stratify=labels[rest]
    )
    return {
        "diffusion": np.sort(diffusion),
        "classifier_train": np.sort(cls_train),
        "classifier_test": np.sort(cls_test),
    }


def upsample(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Bilinearly resize ``[N, 1, h, w]`` images in [0, 1] to ``size``×``size``."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def load_split(split: str, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images [N, 1, size, size] in [0, 1], labels [N])`` of one split (or ``"all"``)."""
    images, labels = _load_raw()
    if split == "all":
        idx = np.arange(len(labels))
    elif split in SPLITS:
        idx = split_indices()[split]
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS + ('all',)}")
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    return upsample(x, size), torch.from_numpy(labels[idx])


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to [-1, 1], the range the diffusion models work in."""
    return images * 2.0 - 1.0


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_rotate_deg: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift_px: float = 2.0,
) -> torch.Tensor:
    """Small random rotations, zooms and shifts of ``[N, C, H, W]`` images (background 0)."""
    n, _, h, _ = images.shape
    u = torch.rand(n, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_rotate_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    shift = (u[:, 2:] * 2 - 1) * (2.0 * max_shift_px / h)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def prompt_for(digit: int, variant: int = 0) -> str:
    """The prompt for ``digit`` in phrasing ``variant`` (taken modulo the number of templates)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    template = PROMPT_TEMPLATES[int(variant) % len(PROMPT_TEMPLATES)]
    return template.format(d=int(digit), w=DIGIT_WORDS[int(digit)])


def eval_prompts(n: int = 64) -> list[tuple[str, int]]:
    """The bundled evaluation prompts: ``n`` pairs ``(prompt, digit)``, digits cycling 0–9.

    Entry ``i`` asks for digit ``i % 10`` in phrasing ``i // 10`` (cycling the templates), so every
    block of ten covers all digits once and successive blocks change the wording.
    """
    return [(prompt_for(i % 10, i // 10), i % 10) for i in range(n)]


def prompt_words() -> list[str]:
    """Every word that occurs in the prompt templates (for building a small tokenizer vocabulary)."""
    words: set[str] = set()
    for digit in range(10):
        for variant in range(len(PROMPT_TEMPLATES)):
            words.update(re.findall(r"\w+|[^\w\s]", prompt_for(digit, variant)))
    return sorted(words)
