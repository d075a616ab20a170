"""Is diffq's smoothing search already AWQ for weight-only 4-bit layers? Layer output errors compared.

    python benchmarks/smoothing_vs_awq.py [--models digits-sd,digits-dit] [--out benchmarks/results/awq]

For every quantizable layer of each bundled denoiser, calibrated as ``diffq.quantize`` calibrates
(the model's default prompts, 8 steps), the layer's weight is quantized to int4 in groups of 64
(``w4a16``'s format, round-to-nearest, min-max ranges) after scaling each input channel by ``s``,
and its output error ``‖x W_qᵀ − x Wᵀ‖²`` on the sampled calibration inputs ``x`` is measured
relative to ``‖x Wᵀ‖²``. The scale vectors compared, each with the strength ``α`` that gives the
layer's smallest error (no scaling when nothing beats it):

* ``none``: no scaling;
* ``diffq``: diffq's search (:func:`diffq.smoothing.search_alpha`): SmoothQuant's
  ``s = max|x|^α / max|w|^(1−α)`` over ``α ∈ {0.25, 0.4, 0.5, 0.6, 0.75}``, kept only on a 2% win;
* ``diffq-grid``: the same vector over AWQ's grid ``α ∈ {0.05, 0.10, …, 0.95}``, any win kept;
* ``awq``: AWQ's ``s = mean|x|^α`` (normalised), over the same grid (llm-awq / AutoAWQ);
* ``awq-lite``: ModelOpt's ``awq_lite`` vector ``mean|x|^α / mean|w|^(1−α)``, same grid.

Convolutions are searched as diffq searches them, as the linear map of each kernel tap. The table
gives the sum over layers of the relative errors (lower is better) and the share of layers where
each vector is the best of the five.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import DEFAULT_RESULTS, machine, machine_line, markdown, write_results

MODELS = ["digits-sd", "digits-dit"]
GRID = tuple(round(i / 20, 2) for i in range(1, 20))
METHODS = ["none", "diffq", "diffq-grid", "awq", "awq-lite"]


def _vectors(rows: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The candidate scale vectors of each method (empty: no scaling)."""
    from diffq.smoothing import ALPHA_CANDIDATES, smoothing_vector

    x_mean = rows.abs().mean(dim=0).clamp_min(1e-5)
    w_mean = weight.abs().mean(dim=0).clamp_min(1e-5)

    def awq(alpha: float) -> torch.Tensor:
        s = x_mean.pow(alpha).clamp(1e-4, 1e4)
        return s / (s.max() * s.min()).sqrt()  # AutoAWQ's normalisation: the scale's range centred on 1

    return {
        "none": [],
        "diffq": [smoothing_vector(act_absmax, weight, a) for a in ALPHA_CANDIDATES],
        "diffq-grid": [smoothing_vector(act_absmax, weight, a) for a in GRID],
        "awq": [awq(a) for a in GRID],
        "awq-lite": [(x_mean.pow(a) / w_mean.pow(1 - a)).clamp(1e-4, 1e4) for a in GRID],
    }


def layer_errors(rows: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor) -> dict[str, float]:
    """Each method's smallest relative output error of the layer at w4 group 64."""
    from diffq.formats import IntFormat
    from diffq.smoothing import layer_error

    fmt = IntFormat(4, True, "group", 64)
    reference = rows @ weight.t()
    scale = float(reference.pow(2).mean()) or 1.0

    def error(smooth: torch.Tensor | None) -> float:
        return layer_error(rows, weight, fmt, None, act_absmax, smooth, False, reference=reference) / scale

    unscaled = error(None)
    out = {}
    for method, vectors in _vectors(rows, weight, act_absmax).items():
        errors = [error(v) for v in vectors]
        if method == "diffq":  # search_alpha keeps a vector only on a clear (2%) win
            best = min(errors, default=unscaled)
            out[method] = best if best < unscaled * 0.98 else unscaled
        else:
            out[method] = min([unscaled, *errors])
    return out


def analyse(model: str, progress: bool = True) -> dict[str, Any]:
    import diffq
    from diffq.layers import conv_channel_weight
    from diffq.pipelines import adapter_for, denoiser_of

    torch.manual_seed(0)
    pipe = diffq.load(model)
    denoiser = denoiser_of(pipe)
    layers, _ = adapter_for(denoiser).layers(denoiser)
    stats = diffq.calibrate(pipe, progress=progress)
    per_layer: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, module in layers.items():
            rows = stats.sample(name)
            grouped = isinstance(module, nn.Conv2d) and module.groups != 1
            if rows is None or rows.shape[0] < 8 or grouped:
                continue
            weight = (module.weight if isinstance(module, nn.Linear) else conv_channel_weight(module)).float()
            if weight.shape[1] % 64:
                continue
            per_layer[name] = layer_errors(rows.float(), weight, stats.channel_absmax(name))
    return {"layers": per_layer, "summary": summarise(per_layer)}


def summarise(per_layer: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    wins = dict.fromkeys(METHODS, 0)
    for errors in per_layer.values():
        wins[min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))] += 1
    count = max(len(per_layer), 1)
    return {m: {"sum_relative_error": sum(e[m] for e in per_layer.values()), "best_share": wins[m] / count}
            for m in METHODS}


def render(results: dict[str, dict[str, Any]], info: dict[str, Any]) -> str:
    rows = []
    for model, result in results.items():
        summary, base = result["summary"], result["summary"]["none"]["sum_relative_error"]
        for method in METHODS:
            s = summary[method]
            rows.append([model, method, len(result["layers"]), f"{s['sum_relative_error']:.4f}",
                         f"{100 * (1 - s['sum_relative_error'] / base):.1f}%", f"{100 * s['best_share']:.0f}%"])
    table = markdown(["model", "scale vector", "layers", "Σ relative output error ↓", "vs none", "best on"], rows)
    return "\n\n".join([
        "**Smoothing search vs AWQ, w4 group-64 weight-only, per-layer output error** "
        "(`python benchmarks/smoothing_vs_awq.py`)",
        table, machine_line(info),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "awq")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    results = {m: analyse(m, progress=not args.no_progress) for m in args.models.split(",") if m}
    text = render(results, info)
    write_results(args.out, text, {"machine": info, "grid": GRID, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
