"""Per-layer sensitivity to quantization: one layer quantized alone, scored against full precision.

Two metrics (``Sensitivity.metric``):

* ``"decoupled"`` (MixDQ's metric decoupling, the default): *content* layers (cross-attention,
  feed-forward: what is drawn) are scored by the structural similarity (SSIM) of the final images
  to full precision; *quality* layers (everything else: how clean it looks) by the
  signal-to-quantization-noise ratio (SQNR, dB) of the denoiser output over the denoising steps.
* ``"image"``: every layer by the PSNR (dB) of the final images to full precision, i.e. by the
  mean squared error that the end-to-end check and ``psnr_vs_fp`` judge; errors of one metric
  need no normalization between groups.

Each entry is one layer quantized alone with one candidate configuration.

A :class:`Sensitivity` is saved as JSON after every layer (atomically), so an interrupted
analysis resumes where it stopped; its ``fingerprint`` ties it to the model and settings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from diffq.errors import CheckpointError, QuantizationInputError
from diffq.formats import SUPPORTED_BITS
from diffq.plan import LayerConfig
from diffq.saving import json_has_keys, write_file

LayerGroup = Literal["content", "quality"]
SensitivityMetric = Literal["decoupled", "image"]
METRICS: tuple[str, ...] = ("decoupled", "image")

SENSITIVITY_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One configuration a layer may get: weight bits, activation bits, low-rank branch rank."""

    w_bits: int
    a_bits: int | None
    rank: int = 0

    @property
    def label(self) -> str:
        return f"w{self.w_bits}a{self.a_bits or 16}" + (f"r{self.rank}" if self.rank else "")

    @classmethod
    def parse(cls, label: str) -> Candidate:
        import re

        match = re.fullmatch(r"w(\d+)a(\d+)(?:r(\d+))?", label)
        if not match:
            raise QuantizationInputError(f"bad candidate label {label!r}; expected e.g. 'w4a8' or 'w4a4r32'.")
        w_bits, a_bits = int(match[1]), int(match[2])
        if w_bits not in SUPPORTED_BITS or a_bits not in (4, 8, 16):
            raise QuantizationInputError(
                f"candidate {label!r}: weights take {', '.join(map(str, SUPPORTED_BITS))} bits and activations "
                "4, 8 or 16; e.g. 'w4a8' or 'w4a4r32'."
            )
        return cls(w_bits, None if a_bits == 16 else a_bits, int(match[3] or 0))


def candidate_config(candidate: Candidate) -> LayerConfig:
    """The base layer config of a candidate, following the uniform presets: per-channel 8-bit or
    group-64 lower-bit weights; static 8-bit or dynamic per-token-group 4-bit activations."""
    a_bits = candidate.a_bits
    return LayerConfig(
        w_bits=candidate.w_bits,
        w_group_size=None if candidate.w_bits == 8 else 64,
        a_bits=a_bits,
        a_mode="dynamic" if a_bits == 4 else "static",
        a_group_size=64 if a_bits == 4 else None,
        rank=candidate.rank,
    )


def default_candidates(
    w_bits: Iterable[int] = (2, 3, 4, 8), a_bits: Iterable[int | None] = (4, 8), ranks: Iterable[int] = (0, 32)
) -> list[Candidate]:
    """Weight bits × activation bits, with and without the low-rank branch."""
    return [Candidate(w, a, r) for w in w_bits for a in a_bits for r in ranks]


def weight_bits_cost(candidate: Candidate, in_features: int, out_features: int) -> float:
    """Bits a layer's weights take under a candidate: packed codes plus the 16-bit branch."""
    return candidate.w_bits * in_features * out_features + 16 * candidate.rank * (in_features + out_features)


def check_metric(metric: str) -> str:
    """``metric`` if it is a sensitivity metric, else a :class:`QuantizationInputError`."""
    if metric not in METRICS:
        raise QuantizationInputError(f"unknown sensitivity metric {metric!r}; use one of {', '.join(METRICS)}.")
    return metric


is_sensitivity_file = json_has_keys("version", "fingerprint", "scores")
"""Whether a path holds a sensitivity analysis diffq wrote (one a rerun resumes from or replaces)."""


@dataclass
class Sensitivity:
    """``scores[layer][candidate label]``: with ``metric="decoupled"``, SSIM (content layers) or SQNR
    in dB (quality layers); with ``metric="image"``, the final images' PSNR in dB for every layer."""

    fingerprint: str
    groups: dict[str, LayerGroup] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    metric: SensitivityMetric = "decoupled"

    def __post_init__(self) -> None:
        check_metric(self.metric)

    def is_complete(self, layers: Iterable[str], candidates: Iterable[Candidate]) -> bool:
        labels = [c.label for c in candidates]
        return all(name in self.scores and all(lb in self.scores[name] for lb in labels) for name in layers)

    def loss(self, name: str, label: str) -> float:
        """A loss where 0 is full precision: ``1 - SSIM``, the noise-to-signal power ratio, or (image
        metric) the final images' mean squared error."""
        score = self.scores[name][label]
        if self.metric == "decoupled" and self.groups[name] == "content":
            return max(0.0, 1.0 - score)
        return 10 ** (-score / 10) if math.isfinite(score) else 0.0

    def merge(self, other: Sensitivity) -> Sensitivity:
        if other.fingerprint != self.fingerprint or other.metric != self.metric:
            raise QuantizationInputError("cannot merge sensitivities measured with different settings.")
        merged = Sensitivity(self.fingerprint, {**self.groups, **other.groups}, metric=self.metric)
        for source in (self, other):
            for name, scores in source.scores.items():
                merged.scores.setdefault(name, {}).update(scores)
        return merged

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the analysis as JSON, atomically; an earlier analysis at ``path`` is replaced, any
        other file only with ``overwrite=True``."""
        text = json.dumps({"version": SENSITIVITY_VERSION, **asdict(self)}, indent=1, sort_keys=True)
        write_file(path, lambda temporary: temporary.write_text(text), overwrite=overwrite,
                   replaceable=is_sensitivity_file)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != SENSITIVITY_VERSION:
                raise CheckpointError(f"{path} was written by another diffq version; measure again.")
            return cls(data["fingerprint"], dict(data["groups"]), {k: dict(v) for k, v in data["scores"].items()},
                       metric=data.get("metric", "decoupled"))
        except FileNotFoundError as err:
            raise CheckpointError(f"no sensitivity file at {path}.") from err
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"sensitivity file {path} is corrupt ({err!r}); delete it and measure again.") from err

    def table(self) -> str:
        labels = sorted({lb for s in self.scores.values() for lb in s})
        header = ["layer", "group", *labels]
        rows = [header]
        for name, scores in self.scores.items():
            rows.append([name, self.groups[name], *(f"{scores[lb]:.4g}" if lb in scores else "-" for lb in labels)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
