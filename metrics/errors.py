"""Errors the metrics and the evaluation runner raise for input a user can fix."""

from __future__ import annotations

from diffq.errors import DiffQError


class EvaluationInputError(DiffQError, ValueError):
    """A bad evaluation setting: number of images, preset list, prompts file, model without prompts."""


class MissingWeightsError(DiffQError, FileNotFoundError):
    """Weights a metric needs (Inception, CLIP, LPIPS) are not on this machine."""
