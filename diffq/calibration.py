"""Streaming activation statistics per quantizable layer and per denoising step.

:class:`ActivationObserver` installs forward pre-hooks on layers and reduces each input as it
passes (per-channel min and max), filing it under the timestep that the denoiser is running
(:mod:`diffq.context`). No activation is stored whole. :class:`CalibrationStats` is the result;
it saves to one safetensors file plus a JSON index, loads back, and merges with other runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffq.context import current_timestep
from diffq.errors import CheckpointError, QuantizationInputError

STATS_VERSION = 1
NO_TIMESTEP = -1.0  # key for activations seen outside a denoiser call


@dataclass
class StepStats:
    """Per-channel running min/max of one layer's input at one timestep."""

    channel_min: torch.Tensor
    channel_max: torch.Tensor
    count: int = 0

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        torch.minimum(self.channel_min, lo, out=self.channel_min)
        torch.maximum(self.channel_max, hi, out=self.channel_max)
        self.count += 1

    @property
    def channel_absmax(self) -> torch.Tensor:
        return torch.maximum(self.channel_min.abs(), self.channel_max.abs())


@dataclass
class CalibrationStats:
    """Activation statistics: ``layers[name][timestep] -> StepStats``."""

    layers: dict[str, dict[float, StepStats]] = field(default_factory=dict)

    def timesteps(self, name: str) -> list[float]:
        return sorted(self.layers[name], reverse=True)

    def absmax(self, name: str, timesteps: list[float] | None = None) -> float:
        """Largest absolute input value of a layer, over all (or the given) timesteps."""
        steps = self._steps(name)
        keys = steps if timesteps is None else timesteps
        return max(float(steps[t].channel_absmax.max()) for t in keys)

    def channel_absmax(self, name: str) -> torch.Tensor:
        """Per-input-channel absolute maximum over all timesteps."""
        return torch.stack([s.channel_absmax for s in self._steps(name).values()]).amax(dim=0)

    def _steps(self, name: str) -> dict[float, StepStats]:
        if name not in self.layers:
            raise QuantizationInputError(
                f"no calibration statistics for layer {name!r}; calibrate with the same model and layer set."
            )
        return self.layers[name]

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Combine two calibration runs (e.g. over different prompts) into a new one."""
        merged = CalibrationStats()
        for source in (self, other):
            for name, steps in source.layers.items():
                dest = merged.layers.setdefault(name, {})
                for t, s in steps.items():
                    if t in dest:
                        dest[t].update(s.channel_min, s.channel_max)
                        dest[t].count += s.count - 1
                    else:
                        dest[t] = StepStats(s.channel_min.clone(), s.channel_max.clone(), s.count)
        return merged

    # ----------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors) and ``path.json`` (index), atomically."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, list[dict]] = {}
        for li, (name, steps) in enumerate(self.layers.items()):
            entries = []
            for si, (t, s) in enumerate(sorted(steps.items())):
                key = f"{li}.{si}"
                tensors[f"{key}.min"] = s.channel_min.contiguous()
                tensors[f"{key}.max"] = s.channel_max.contiguous()
                entries.append({"key": key, "timestep": t, "count": s.count})
            index[name] = entries
        meta = {"version": STATS_VERSION, "layers": index}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp))
        _atomic_write(Path(f"{path}.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        try:
            meta = json.loads(Path(f"{path}.json").read_text())
            tensors = load_file(str(path))
            stats = cls()
            for name, entries in meta["layers"].items():
                stats.layers[name] = {
                    float(e["timestep"]): StepStats(tensors[f"{e['key']}.min"], tensors[f"{e['key']}.max"], e["count"])
                    for e in entries
                }
            return stats
        except FileNotFoundError as err:
            raise CheckpointError(f"calibration file missing: {err.filename}; run diffq.calibrate again.") from err
        except (KeyError, ValueError, OSError) as err:
            raise CheckpointError(f"calibration statistics at {path} are corrupt ({err!r}); recalibrate.") from err


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


class ActivationObserver:
    """Records per-channel input ranges of the given layers while it is active."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.stats = CalibrationStats()

    def _hook(self, name: str, module: nn.Module):
        dim = _channel_dim(module)

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise QuantizationInputError(
                    f"layer {name!r} received NaN or infinity during calibration; "
                    "run calibration in float32 or check the model."
                )
            x = x.movedim(dim, -1).reshape(-1, x.shape[dim]).float()
            lo, hi = x.amin(dim=0).cpu(), x.amax(dim=0).cpu()
            t = current_timestep()
            key = NO_TIMESTEP if t is None else float(t)
            steps = self.stats.layers.setdefault(name, {})
            if key in steps:
                steps[key].update(lo, hi)
            else:
                steps[key] = StepStats(lo, hi, 1)

        return record

    @contextmanager
    def observe(self) -> Iterator[CalibrationStats]:
        """Hooks are installed inside the block and removed after it, even on error."""
        handles = [m.register_forward_pre_hook(self._hook(n, m)) for n, m in self.layers.items()]
        try:
            yield self.stats
        finally:
            for h in handles:
                h.remove()
