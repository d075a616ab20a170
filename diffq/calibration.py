"""Streaming activation statistics per quantizable layer and per denoising step.

:class:`ActivationObserver` installs forward pre-hooks on layers and reduces each input as it
passes, filing it under the timestep the denoiser is running (:mod:`diffq.context`) and, under
classifier-free guidance, under the ``"uncond"`` or ``"cond"`` half of the batch. Per key it keeps
per-channel min and max and a histogram of ``|x|`` on fixed log2 bins (so percentiles can be
read and runs can be merged). Per layer it also keeps a small, seeded reservoir sample of input
rows (tokens or pixels), tagged with their timestep, for smoothing and clipping searches. No
activation is stored whole.

:class:`CalibrationStats` saves to one safetensors file plus a JSON index, loads, and merges.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffq.context import cfg_split_active, current_timestep
from diffq.errors import CheckpointError, QuantizationInputError
from diffq.memory import return_freed_memory
from diffq.saving import check_file_target, json_has_keys, write_file

STATS_VERSION = 2
NO_TIMESTEP = -1.0  # key for activations seen outside a denoiser call
BRANCHES = ("cond", "uncond")

# |x| histogram: bin 0 holds |x| < 2^HIST_MIN_EXP (zeros included), then HIST_BINS_PER_OCTAVE
# bins per power of two up to 2^HIST_MAX_EXP; larger values land in the last bin.
HIST_MIN_EXP, HIST_MAX_EXP, HIST_BINS_PER_OCTAVE = -24, 24, 8
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE + 1


REDUCE_ELEMENTS = 1 << 22
"""Statistics reduce an input this many elements at a time (16 MiB of float32; see :meth:`StepStats.of`)."""


def _row_chunks(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """``rows`` in blocks of whole rows, about :data:`REDUCE_ELEMENTS` elements each."""
    step = max(1, REDUCE_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step]


def histogram_edges() -> torch.Tensor:
    """Upper edges of the ``|x|`` histogram bins (``HIST_BINS`` values)."""
    exps = torch.arange(HIST_BINS, dtype=torch.float64) / HIST_BINS_PER_OCTAVE + HIST_MIN_EXP
    return torch.pow(2.0, exps).to(torch.float32)


def abs_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of ``|x|`` over the fixed log2 bins (int64)."""
    logs = torch.log2(x.abs().float().clamp_min(2.0**HIST_MIN_EXP))
    index = torch.ceil((logs - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE).long().clamp_(0, HIST_BINS - 1)
    return torch.bincount(index.flatten(), minlength=HIST_BINS)


@dataclass
class StepStats:
    """Running per-channel min/max and ``|x|`` histogram of one layer's input at one step and branch."""

    channel_min: torch.Tensor
    channel_max: torch.Tensor
    histogram: torch.Tensor
    count: int = 1

    @classmethod
    def of(cls, rows: torch.Tensor) -> StepStats:
        """The statistics of ``rows`` (``[n, channels]``, any dtype and device), reduced in float32 on
        the CPU a few million elements at a time: the same figures as reducing all of them at once,
        without a float32 copy of the input and the histogram's temporaries at its size (a Flux single
        block's ``proj_out`` reads 4,608 tokens x 15,360 channels at FLUX.1's 1024x1024: 1.7 GB of them)."""
        channel_min = channel_max = histogram = None
        for chunk in _row_chunks(rows):
            chunk = chunk.float().cpu()
            low, high, counts = chunk.amin(dim=0), chunk.amax(dim=0), abs_histogram(chunk)
            if histogram is None:
                channel_min, channel_max, histogram = low, high, counts
            else:
                torch.minimum(channel_min, low, out=channel_min)
                torch.maximum(channel_max, high, out=channel_max)
                histogram += counts
        if histogram is None:
            raise QuantizationInputError("a calibration input has no rows (tokens or pixels) to take statistics of.")
        return cls(channel_min, channel_max, histogram)

    def is_finite(self) -> bool:
        """Whether every input value was finite (``amin``/``amax`` propagate NaN)."""
        return bool(torch.isfinite(self.channel_min).all() and torch.isfinite(self.channel_max).all())

    def update(self, other: StepStats) -> None:
        torch.minimum(self.channel_min, other.channel_min, out=self.channel_min)
        torch.maximum(self.channel_max, other.channel_max, out=self.channel_max)
        self.histogram += other.histogram
        self.count += other.count

    def clone(self) -> StepStats:
        return StepStats(self.channel_min.clone(), self.channel_max.clone(), self.histogram.clone(), self.count)

    @property
    def channel_absmax(self) -> torch.Tensor:
        return torch.maximum(self.channel_min.abs(), self.channel_max.abs())


StepKey = tuple[float, str]  # (timestep, branch)


@dataclass
class LayerSample:
    """A reservoir sample of input rows with the timestep each was seen at."""

    rows: torch.Tensor
    timesteps: torch.Tensor
    seen: int = 0


@dataclass
class CalibrationStats:
    """Activation statistics: ``layers[name][(timestep, branch)] -> StepStats``, plus samples.

    ``bos[name]`` holds the first-token input vector of cross-attention key/value projections
    whose first token was identical in every call (the text encoder's BOS embedding).
    """

    layers: dict[str, dict[StepKey, StepStats]] = field(default_factory=dict)
    samples: dict[str, LayerSample] = field(default_factory=dict)
    bos: dict[str, torch.Tensor] = field(default_factory=dict)

    # ----------------------------------------------------------------- queries

    def _steps(self, name: str) -> dict[StepKey, StepStats]:
        if name not in self.layers:
            raise QuantizationInputError(
                f"no calibration statistics for layer {name!r}; calibrate with the same model and layer set."
            )
        return self.layers[name]

    def timesteps(self, name: str) -> list[float]:
        """The timesteps a layer was observed at, largest (noisiest) first."""
        return sorted({t for t, _ in self._steps(name)}, reverse=True)

    def _select(self, name: str, timesteps: list[float] | None, branch: str | None) -> list[StepStats]:
        wanted = None if timesteps is None else set(timesteps)
        chosen = [
            s
            for (t, b), s in self._steps(name).items()
            if (wanted is None or t in wanted) and (branch is None or b == branch)
        ]
        if not chosen:
            raise QuantizationInputError(f"layer {name!r} has no statistics for timesteps {timesteps}, branch {branch}.")
        return chosen

    def channel_absmax(
        self, name: str, timesteps: list[float] | None = None, branch: str | None = None
    ) -> torch.Tensor:
        """Per-input-channel absolute maximum over the selected steps and branches."""
        return torch.stack([s.channel_absmax for s in self._select(name, timesteps, branch)]).amax(dim=0)

    def absmax(self, name: str, timesteps: list[float] | None = None, branch: str | None = None) -> float:
        """Largest absolute input value of a layer over the selected steps and branches."""
        return float(self.channel_absmax(name, timesteps, branch).max())

    def step_absmax(self, name: str) -> dict[float, float]:
        """Absolute maximum per timestep (both branches)."""
        return {t: self.absmax(name, [t]) for t in self.timesteps(name)}

    def histogram(self, name: str, timesteps: list[float] | None = None, branch: str | None = None) -> torch.Tensor:
        return torch.stack([s.histogram for s in self._select(name, timesteps, branch)]).sum(dim=0)

    def percentile(self, name: str, q: float, timesteps: list[float] | None = None) -> float:
        """The ``q``-th percentile (0–100) of ``|x|``, read from the histogram (a bin's upper edge)."""
        if not 0 < q <= 100:
            raise QuantizationInputError(f"percentile must be in (0, 100], got {q}.")
        hist = self.histogram(name, timesteps).double()
        cumulative = torch.cumsum(hist, 0) / hist.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(q / 100, dtype=torch.float64)))
        return float(histogram_edges()[min(index, HIST_BINS - 1)])

    def drift(self, name: str) -> float:
        """How much a layer's range moves across steps: max over min of the per-step absmax."""
        values = [v for t, v in self.step_absmax(name).items() if t != NO_TIMESTEP]
        if len(values) < 2 or min(values) <= 0:
            return 1.0
        return max(values) / min(values)

    def sample(self, name: str, timesteps: list[float] | None = None) -> torch.Tensor | None:
        """Sampled input rows of a layer (float32), optionally only those seen at ``timesteps``."""
        sample = self.samples.get(name)
        if sample is None or sample.rows.shape[0] == 0:
            return None
        rows = sample.rows.float()
        if timesteps is None:
            return rows
        mask = torch.isin(sample.timesteps, torch.tensor(timesteps, dtype=sample.timesteps.dtype))
        return rows[mask] if mask.any() else None

    # ----------------------------------------------------------------- merging

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Combine two calibration runs (e.g. over different prompts) into a new one."""
        merged = CalibrationStats()
        for source in (self, other):
            for name, steps in source.layers.items():
                dest = merged.layers.setdefault(name, {})
                for key, s in steps.items():
                    if key in dest:
                        dest[key].update(s)
                    else:
                        dest[key] = s.clone()
            for name, sample in source.samples.items():
                if name in merged.samples:
                    mine = merged.samples[name]
                    merged.samples[name] = LayerSample(
                        torch.cat([mine.rows, sample.rows]),
                        torch.cat([mine.timesteps, sample.timesteps]),
                        mine.seen + sample.seen,
                    )
                else:
                    merged.samples[name] = LayerSample(sample.rows.clone(), sample.timesteps.clone(), sample.seen)
        for name in set(self.bos) | set(other.bos):
            # A BOS vector survives if both runs saw the same one, or only one run saw the layer.
            mine, theirs = self.bos.get(name), other.bos.get(name)
            if mine is not None and theirs is not None and torch.allclose(mine, theirs):
                merged.bos[name] = mine.clone()
            elif mine is not None and name not in other.layers:
                merged.bos[name] = mine.clone()
            elif theirs is not None and name not in self.layers:
                merged.bos[name] = theirs.clone()
        return merged

    # ----------------------------------------------------------------- files

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``path`` (safetensors) and ``path.json`` (index), each atomically. Earlier statistics
        at ``path`` are replaced; any other existing file only with ``overwrite=True``."""
        path = Path(path)
        index_path = Path(f"{path}.json")
        check_file_target(path, overwrite=overwrite, replaceable=is_stats_file)  # refuse before writing either
        check_file_target(index_path, overwrite=overwrite, replaceable=json_has_keys("version", "layers"))
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, dict] = {}
        for li, (name, steps) in enumerate(self.layers.items()):
            entries = []
            for si, ((t, branch), s) in enumerate(sorted(steps.items())):
                key = f"{li}.{si}"
                tensors[f"{key}.min"] = s.channel_min.contiguous()
                tensors[f"{key}.max"] = s.channel_max.contiguous()
                tensors[f"{key}.hist"] = s.histogram.contiguous()
                entries.append({"key": key, "timestep": t, "branch": branch, "count": s.count})
            layer: dict = {"steps": entries}
            if name in self.samples:
                tensors[f"{li}.sample"] = self.samples[name].rows.contiguous()
                tensors[f"{li}.sample_t"] = self.samples[name].timesteps.contiguous()
                layer["seen"] = self.samples[name].seen
            if name in self.bos:
                tensors[f"{li}.bos"] = self.bos[name].contiguous()
            index[name] = layer
        meta = {"version": STATS_VERSION, "layers": index}
        write_file(path, lambda temporary: save_file(tensors, str(temporary), metadata=STATS_METADATA), overwrite=True)
        write_file(index_path, lambda temporary: temporary.write_text(json.dumps(meta)), overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read statistics written by :meth:`save`."""
        path = Path(path)
        try:
            meta = json.loads(Path(f"{path}.json").read_text())
            if meta.get("version") != STATS_VERSION:
                raise CheckpointError(
                    f"calibration file {path} has format {meta.get('version')}, this diffq reads "
                    f"{STATS_VERSION}; recalibrate."
                )
            tensors = load_file(str(path))
            stats = cls()
            for li, (name, layer) in enumerate(meta["layers"].items()):
                stats.layers[name] = {
                    (float(e["timestep"]), e["branch"]): StepStats(
                        tensors[f"{e['key']}.min"], tensors[f"{e['key']}.max"], tensors[f"{e['key']}.hist"], e["count"]
                    )
                    for e in layer["steps"]
                }
                if f"{li}.sample" in tensors:
                    stats.samples[name] = LayerSample(tensors[f"{li}.sample"], tensors[f"{li}.sample_t"], layer["seen"])
                if f"{li}.bos" in tensors:
                    stats.bos[name] = tensors[f"{li}.bos"]
            return stats
        except FileNotFoundError as err:
            raise CheckpointError(f"calibration file missing: {err.filename}; run diffq.calibrate again.") from err
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"calibration statistics at {path} are corrupt ({err!r}); recalibrate.") from err


STATS_METADATA = {"written_by": "diffq", "kind": "calibration-stats"}


def is_stats_file(path: Path) -> bool:
    """Whether ``path`` holds calibration statistics diffq wrote (its safetensors header says so)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("kind") == STATS_METADATA["kind"]
    except (OSError, SafetensorError):  # missing, or not a safetensors file at all
        return False


def _channel_rows(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``x`` as ``[rows, channels]`` in its own dtype and device (a view where the layout allows)."""
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


class ActivationObserver:
    """Records input statistics of the given layers while :meth:`observe` is active.

    Args:
        layers: name -> Linear/Conv2d module.
        sample_rows: rows (tokens or pixels) kept per layer for smoothing/clipping searches.
        bos_layers: names of layers whose input is ``[batch, tokens, features]`` text states with
            a BOS first token; the first token is kept out of the statistics and remembered.
        seed: seed of the reservoir sampling (calibration is deterministic).
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        sample_rows: int = 256,
        bos_layers: set[str] | frozenset[str] = frozenset(),
        seed: int = 0,
    ) -> None:
        self.layers = layers
        self.sample_rows = sample_rows
        self.bos_layers = set(bos_layers)
        self.stats = CalibrationStats()
        self._bos_broken: set[str] = set()
        self._generator = torch.Generator().manual_seed(seed)

    def _record_bos(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Remember the first token if it is the same everywhere; return the other tokens."""
        if x.dim() < 3 or x.shape[-2] < 2:
            self._bos_broken.add(name)
            return x
        first = x[..., 0, :].reshape(-1, x.shape[-1]).float().cpu()
        seen = self.stats.bos.get(name, first[0].clone())
        if name in self._bos_broken or not torch.allclose(first, seen.expand_as(first), rtol=1e-4, atol=1e-5):
            self._bos_broken.add(name)
            self.stats.bos.pop(name, None)
            return x
        self.stats.bos[name] = seen
        return x[..., 1:, :]

    def _add_sample(self, name: str, rows: torch.Tensor, t: float) -> None:
        """Offer ``rows`` (``[n, channels]``, any dtype and device) to ``name``'s reservoir, kept as
        float16 on the CPU."""
        if self.sample_rows <= 0:
            return
        sample = self.stats.samples.get(name)
        if sample is None:
            sample = LayerSample(
                torch.zeros(0, rows.shape[1], dtype=torch.float16), torch.zeros(0, dtype=torch.float32), 0
            )
            self.stats.samples[name] = sample
        n = rows.shape[0]
        # Reservoir sampling, vectorised: row i of this batch is the (seen + i)-th row overall.
        order = sample.seen + torch.arange(n, dtype=torch.float64)
        slots = (torch.rand(n, generator=self._generator, dtype=torch.float64) * (order + 1)).long()
        free = self.sample_rows - sample.rows.shape[0]
        if free > 0:
            take = min(free, n)
            sample.rows = torch.cat([sample.rows, rows[:take].to("cpu", torch.float16)])
            sample.timesteps = torch.cat([sample.timesteps, torch.full((take,), t)])
            slots[:take] = -1
        picked = ((slots >= 0) & (slots < self.sample_rows)).nonzero().squeeze(1)
        if picked.numel():
            # Two rows of one batch may draw the same slot; the later one replaces the earlier, as in
            # sequential reservoir sampling. Indexed assignment with repeated indices leaves the winner
            # to the thread schedule, so each slot is written once, with its last row.
            drawn = slots[picked]
            by_slot = torch.argsort(drawn, stable=True)
            slot_of, row_of = drawn[by_slot], picked[by_slot]
            last = torch.ones_like(slot_of, dtype=torch.bool)
            last[:-1] = slot_of[1:] != slot_of[:-1]
            sample.rows[slot_of[last]] = rows[row_of[last].to(rows.device)].to("cpu", torch.float16)
            sample.timesteps[slot_of[last]] = t
        sample.seen += n

    def _hook(self, name: str, module: nn.Module):
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if name in self.bos_layers:
                x = self._record_bos(name, x)
            t = current_timestep()
            key_t = NO_TIMESTEP if t is None else float(t)
            rows = _channel_rows(x, channel_dim)  # batch-major: each half of the batch is a run of rows
            halves = {"cond": rows}
            if cfg_split_active() and x.shape[0] % 2 == 0 and x.shape[0] >= 2:
                half = rows.shape[0] // 2
                halves = {"uncond": rows[:half], "cond": rows[half:]}
            new_steps = {branch: StepStats.of(part) for branch, part in halves.items()}
            if not all(step.is_finite() for step in new_steps.values()):  # min and max carry any NaN or inf
                raise QuantizationInputError(
                    f"layer {name!r} received NaN or infinity during calibration; "
                    "run calibration in float32 or check the model."
                )
            steps = self.stats.layers.setdefault(name, {})
            for branch, step in new_steps.items():
                if (key_t, branch) in steps:
                    steps[(key_t, branch)].update(step)
                else:
                    steps[(key_t, branch)] = step
            self._add_sample(name, rows, key_t)

        return record

    @contextmanager
    def observe(self, model: nn.Module | None = None) -> Iterator[CalibrationStats]:
        """Hooks are installed inside the block and removed after it, even on error.

        With ``model`` (the module whose calls run the layers), freed memory goes back to the system
        after each of its calls: the reductions free many blocks of a few MB per layer and call, which
        glibc kept (with an SD 1.5-size UNet in memory its default calibration grew the heap by about
        the float weights again, benchmarks/RESULTS.md)."""
        handles = [m.register_forward_pre_hook(self._hook(n, m)) for n, m in self.layers.items()]
        if model is not None:
            handles.append(model.register_forward_hook(lambda *_: return_freed_memory(), always_call=True))
        try:
            yield self.stats
        finally:
            for h in handles:
                h.remove()


def timestep_groups(timesteps: list[float], groups: int) -> list[float]:
    """Ascending boundaries that split the observed timesteps into ``groups`` runs of similar size.

    A timestep ``t`` belongs to group ``bisect_right(bounds, t)``; values between calibrated
    steps fall into the nearest run, so any ``num_inference_steps`` works at inference.
    """
    ordered = sorted(t for t in set(timesteps) if t != NO_TIMESTEP)
    groups = max(1, min(groups, len(ordered)))
    if groups == 1:
        return []
    size = len(ordered) / groups
    cuts = [ordered[math.ceil(size * g) - 1 : math.ceil(size * g) + 1] for g in range(1, groups)]
    return [(lo + hi) / 2 for lo, hi in cuts]
