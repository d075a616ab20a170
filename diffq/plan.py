"""`QuantPlan`: what each layer becomes. The contract between allocate, convert and the file format."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from diffq.errors import CheckpointError, QuantizationInputError
from diffq.formats import SUPPORTED_BITS
from diffq.saving import json_has_keys, write_file

ActivationMode = Literal["dynamic", "static"]
WeightRounding = Literal["nearest", "gptq"]
ClipMethod = Literal["minmax", "mse", "percentile"]

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerConfig:
    """How one Linear/Conv2d layer is quantized.

    Attributes:
        w_bits: weight bit width (2, 3, 4 or 8).
        w_group_size: weights share a scale per this many input elements; ``None`` means one
            scale per output channel.
        w_symmetric: symmetric weights (no zero point) or asymmetric (with zero points).
        a_bits: activation bit width (4 or 8), or ``None`` to keep activations in 16/32-bit.
        a_mode: ``"dynamic"`` (scale per token, computed at run time) or ``"static"`` (scale
            from calibration).
        a_group_size: for dynamic activations, a scale per token and this many features.
        a_groups: static activations: number of timestep groups, each with its own scale
            (looked up by timestep value at run time).
        a_split: for a convolution whose input is a concatenation (UNet skip connections), the
            channel where the second part starts; each part gets its own activation scale.
        smooth_alpha: SmoothQuant migration strength; ``None`` = no smoothing vector.
        w_clip: weight range per block: ``"minmax"`` or ``"mse"`` (clip ratio searched per block).
        a_clip: static activation range: ``"minmax"``, ``"mse"`` (searched on calibration
            samples) or ``"percentile"`` (99.99th percentile of ``|x|``).
        bos: cross-attention key/value projection whose first (BOS) token is computed in full
            precision from a stored vector; the other tokens are quantized.
        w_round: how weights are rounded onto their grid: ``"nearest"``, or ``"gptq"`` (each input
            column's rounding error moved onto the columns not yet rounded, against the Hessian of
            the calibration inputs; :mod:`diffq.gptq`). Needs calibration samples.
        rank: rank of the 16-bit low-rank branch that absorbs weight outliers (SVDQuant); the
            quantized weight is the residual. ``0`` = no branch. Linear layers and Conv2d with
            groups=1 (a convolution to ``rank`` channels, then a 1×1 one).
    """

    w_bits: int = 8
    w_group_size: int | None = None
    w_symmetric: bool = True
    a_bits: int | None = 8
    a_mode: ActivationMode = "static"
    a_group_size: int | None = None
    a_groups: int = 1
    a_split: int | None = None
    smooth_alpha: float | None = None
    w_clip: ClipMethod = "minmax"
    a_clip: ClipMethod = "minmax"
    bos: bool = False
    rank: int = 0
    w_round: WeightRounding = "nearest"

    def __post_init__(self) -> None:
        if self.w_bits not in SUPPORTED_BITS:
            raise QuantizationInputError(f"w_bits={self.w_bits} is not supported; use one of {SUPPORTED_BITS}.")
        if self.a_bits not in (None, 4, 8):
            raise QuantizationInputError(f"a_bits={self.a_bits} is not supported; use 4, 8 or None.")
        if self.a_mode not in ("dynamic", "static"):
            raise QuantizationInputError(f"a_mode={self.a_mode!r} is not supported; use 'dynamic' or 'static'.")
        if self.rank < 0:
            raise QuantizationInputError(f"rank must be 0 (no low-rank branch) or positive, got {self.rank}.")
        if self.a_groups < 1:
            raise QuantizationInputError(f"a_groups must be at least 1, got {self.a_groups}.")
        if self.w_round not in ("nearest", "gptq"):
            raise QuantizationInputError(f"w_round={self.w_round!r}; use 'nearest' or 'gptq'.")
        for name, value in (("w_clip", self.w_clip), ("a_clip", self.a_clip)):
            if value not in ("minmax", "mse", "percentile"):
                raise QuantizationInputError(f"{name}={value!r}; use 'minmax', 'mse' or 'percentile'.")

    @property
    def static_activations(self) -> bool:
        return self.a_bits is not None and self.a_mode == "static"

    @property
    def label(self) -> str:
        """Short name such as ``w4a8`` or ``w4a16``."""
        return f"w{self.w_bits}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["w_round"] == "nearest":  # plans without GPTQ stay readable by diffq versions before it
            del data["w_round"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(
                f"layer config has unknown keys {sorted(unknown)}; it was written by a newer diffq — upgrade diffq."
            )
        return cls(**data)


@dataclass
class QuantPlan:
    """Per-layer quantization settings of one denoiser, plus the layers kept in 16-bit and why.

    ``note`` says how the plan was chosen when that is worth keeping with it (mixed precision
    records its end-to-end check against the uniform plan). ``selection`` holds the ``include`` /
    ``exclude`` patterns the layers were chosen with (:mod:`diffq.selection`), when any were given.
    """

    preset: str
    layers: dict[str, LayerConfig] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    note: str = ""
    selection: dict[str, list[str]] = field(default_factory=dict)

    def with_layer(self, name: str, config: LayerConfig) -> QuantPlan:
        """A copy with one layer's config replaced."""
        return replace(self, layers={**self.layers, name: config})

    def average_weight_bits(self, param_counts: dict[str, int]) -> float:
        """Average weight bits over the parameters of the quantized layers."""
        total = sum(param_counts[name] for name in self.layers)
        if total == 0:
            return 0.0
        return sum(cfg.w_bits * param_counts[name] for name, cfg in self.layers.items()) / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "preset": self.preset,
            "layers": {name: cfg.to_dict() for name, cfg in self.layers.items()},
            "skipped": dict(self.skipped),
        } | ({"note": self.note} if self.note else {}) | (
            {"selection": {key: list(value) for key, value in self.selection.items()}} if self.selection else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        try:
            version = data.get("format_version", PLAN_FORMAT_VERSION)
            if version > PLAN_FORMAT_VERSION:
                raise CheckpointError(f"plan format {version} is newer than this diffq understands; upgrade diffq.")
            layers = {name: LayerConfig.from_dict(cfg) for name, cfg in data["layers"].items()}
            selection = {str(key): [str(p) for p in value] for key, value in data.get("selection", {}).items()}
            return cls(preset=data["preset"], layers=layers, skipped=dict(data.get("skipped", {})),
                       note=str(data.get("note", "")), selection=selection)
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"not a valid diffq QuantPlan ({err!r}); the checkpoint may be corrupt.") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the plan as JSON, atomically; an earlier plan at ``path`` is replaced, any other file
        only with ``overwrite=True``."""
        text = self.to_json()
        write_file(path, lambda temporary: temporary.write_text(text), overwrite=overwrite,
                   replaceable=json_has_keys("format_version", "preset", "layers"))

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"QuantPlan JSON is unreadable ({err}); the checkpoint may be truncated.") from err

    def table(self) -> str:
        """A plain-text table: one row per layer with its bits and group size."""
        rows = [("layer", "weights", "group", "activations", "extras")]
        for name, cfg in self.layers.items():
            acts = "16-bit" if cfg.a_bits is None else f"int{cfg.a_bits} {cfg.a_mode}"
            if cfg.static_activations and cfg.a_groups > 1:
                acts += f" x{cfg.a_groups} step groups"
            extras = [f"smooth a={cfg.smooth_alpha:g}"] if cfg.smooth_alpha is not None else []
            extras += ["split"] if cfg.a_split else []
            extras += ["bos-fp"] if cfg.bos else []
            extras += [f"rank {cfg.rank}"] if cfg.rank else []
            rows.append((name, f"int{cfg.w_bits}", str(cfg.w_group_size or "channel"), acts, ", ".join(extras)))
        for name, reason in self.skipped.items():
            rows.append((name, "16-bit", "-", f"kept: {reason}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.selection:
            lines.insert(0, "layers chosen with " + " ".join(f"{k}={v}" for k, v in self.selection.items()))
        if self.note:
            lines.insert(0, f"{self.preset}: {self.note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
