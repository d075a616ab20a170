"""Time to quantize an SD 1.5-size UNet on the CPU (diffq presets vs optimum-quanto and torchao),
and, on CUDA, denoiser latency per step at SDXL and Flux sizes (fp16 vs diffq presets).

    python benchmarks/speed.py [--presets w8a8-rtn,w8a8,...] [--peers quanto-w8a16,...|none]
        [--calibration-samples 2] [--latent-size 32] [--out benchmarks/results/speed]

**Quantization time (CPU).** A ``UNet2DConditionModel`` from SD 1.5's published config
(``memory.SD15_UNET``, 859.5 M parameters) with seeded random weights, float32, is quantized once
per method, each time freshly built. diffq runs the three steps ``diffq.quantize`` runs on a bare
module, timed apart: calibration (forward passes over ``--calibration-samples`` example inputs —
a ``--latent-size`` latent, 77 text tokens, timesteps spread over 999..1 — with diffq's activation
observers), allocation (``diffq.allocate``: per-layer clipping, smoothing and timestep-group
choices; for mixed precision the integer program) and conversion (``diffq.convert``: packing).
Mixed precision needs a per-layer sensitivity analysis, which measures images and so needs a
pipeline: here its allocation runs on synthetic scores for every layer and candidate, and the
analysis itself is not timed. Peers: optimum-quanto's ``quantize`` + ``freeze`` (for ``w8a8`` with
``Calibration()`` over the same example inputs in between) and torchao's ``quantize_``.

The CPU default (2 calibration samples at a 32x32 latent) keeps calibration cheap; allocation and
conversion dominate and scale with the parameter count, not with the samples. On the shared
2-core machine this repository is developed on, the default run takes about 1.5-2 hours
(``benchmarks/README.md``); ``--presets``/``--peers`` pick a subset, ``--unet tiny`` smoke-tests.

**Latency (CUDA only).** With a GPU, SDXL's UNet (1024x1024: a 128x128 latent, batch 2 for
classifier-free guidance, 77 tokens) and Flux.1's transformer (1024x1024: 4096 image tokens,
512 text tokens, batch 1, guidance embedded) are built in float16 with random weights, and one
denoiser call (one step) is timed — median of ``--reps`` after warm-up, CUDA synchronised — in
fp16 and after each ``--cuda-presets`` preset (calibrated on ``--cuda-calibration-samples``
inputs). Without CUDA the report says so.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results
from memory import MODELS, ModelSpec, build, stored_bytes

CPU_PRESETS = ["w8a8-rtn", "w8a8", "w4a8-rtn", "w4a8", "w4a16", "w4a4", "w4.0a8", "w3.5a8"]
CPU_PEERS = ["quanto-w8a16", "quanto-w4a16", "quanto-w8a8", "torchao-w8a16", "torchao-w8a8", "torchao-w4a16"]
CUDA_MODELS = ["sdxl", "flux"]
CUDA_PRESETS = ["w8a8", "w4a8", "w4a16", "w4a4"]

# A small UNet of SD 1.5's layout, for smoke tests (`--unet tiny`).
TINY_UNET = ModelSpec("tiny SD-layout UNet", "UNet2DConditionModel", dict(
    block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
), True)
UNETS = {"sd15": MODELS["sd15"], "tiny": TINY_UNET}


# --- inputs ---------------------------------------------------------------------------------------


def example_inputs(
    model: nn.Module,
    *,
    latent: int,
    text_tokens: int,
    batch: int = 1,
    timestep: float = 500.0,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Forward kwargs of one denoiser call at a ``latent`` x ``latent`` latent (random conditioning)."""
    config = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    name = type(model).__name__
    if name == "UNet2DConditionModel":
        kwargs: dict[str, Any] = {
            "sample": randn(batch, config.in_channels, latent, latent),
            "timestep": torch.full((batch,), timestep, device=device),
            "encoder_hidden_states": randn(batch, text_tokens, config.cross_attention_dim),
        }
        if config.addition_embed_type == "text_time":
            time_ids = 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn(batch, config.projection_class_embeddings_input_dim - time_ids),
                "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch,
                                         device=device, dtype=dtype),
            }
        return kwargs
    if name == "FluxTransformer2DModel":
        image_tokens = (latent // 2) ** 2
        return {
            "hidden_states": randn(batch, image_tokens, config.in_channels),
            "encoder_hidden_states": randn(batch, text_tokens, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim),
            "timestep": torch.full((batch,), timestep / 1000, device=device, dtype=dtype),
            "img_ids": torch.zeros(image_tokens, 3, device=device, dtype=dtype),
            "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
        }
    raise ValueError(f"no example inputs for {name}")


def calibration_inputs(model: nn.Module, samples: int, latent: int, text_tokens: int = 77) -> list[dict[str, Any]]:
    """``samples`` example inputs, timesteps spread evenly over 999..1, seeded."""
    generator = torch.Generator().manual_seed(0)
    steps = [999.0] if samples == 1 else [999 - i * 998 / (samples - 1) for i in range(samples)]
    return [example_inputs(model, latent=latent, text_tokens=text_tokens, timestep=t, generator=generator)
            for t in steps]


def synthetic_sensitivity(model: nn.Module, preset: str, seed: int = 0):
    """Sensitivity scores for every layer and candidate of a mixed preset, made up (fewer bits score
    worse, with noise): enough for the allocation to solve a real-size integer program."""
    from diffq.pipelines.adapters import adapter_for
    from diffq.presets import get_preset
    from diffq.sensitivity import Sensitivity

    recipe = get_preset(preset)
    adapter = adapter_for(model)
    layers, _ = adapter.layers(model)
    rng = torch.Generator().manual_seed(seed)
    groups, scores = {}, {}
    for name in layers:
        groups[name] = adapter.group_of(name)
        scores[name] = {}
        for c in recipe.candidates:
            noise = float(torch.rand((), generator=rng))
            sqnr = 6.0 * c.w_bits + (3.0 if c.rank else 0.0) + (6.0 if c.a_bits == 8 else 0.0) + 4 * noise
            scores[name][c.label] = 1 - 10 ** (-sqnr / 10) if groups[name] == "content" else sqnr
    return Sensitivity(f"synthetic-{seed}", groups, scores)


# --- CPU: quantization time -------------------------------------------------------------------------


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_diffq(model: nn.Module, preset: str, inputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Quantize ``model`` in place with a diffq preset, as ``diffq.quantize`` does for a bare module,
    timing calibration, allocation and conversion apart."""
    import diffq
    from diffq.api import _calibrate_module  # what diffq.quantize runs for a bare module
    from diffq.pipelines.adapters import adapter_for

    recipe = diffq.get_preset(preset)
    layers, _ = adapter_for(model).layers(model)
    phases: dict[str, float] = {}
    start = _now()
    stats = _calibrate_module(model, layers, list(inputs), False, preset) if recipe.needs_calibration() else None
    phases["calibration"] = _now() - start
    sensitivity = synthetic_sensitivity(model, preset) if recipe.is_mixed else None
    start = _now()
    plan = diffq.allocate(model, stats, preset=preset, sensitivity=sensitivity, progress=False)
    phases["allocation"] = _now() - start
    start = _now()
    diffq.convert(model, plan, stats, progress=False)
    phases["conversion"] = _now() - start
    return phases


def _quanto(weights: str, activations: str | None = None) -> Callable[[nn.Module, Sequence[Mapping]], dict]:
    def run(model: nn.Module, inputs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        from optimum import quanto as q

        start = _now()
        q.quantize(model, weights=getattr(q, weights), activations=activations and getattr(q, activations))
        phases = {"quantize": _now() - start}
        if activations:
            start = _now()
            with q.Calibration(), torch.no_grad():
                for kwargs in inputs:
                    model(**kwargs)
            phases["calibration"] = _now() - start
        start = _now()
        q.freeze(model)
        phases["freeze"] = _now() - start
        return phases

    return run


def _torchao(config: Callable[[], Any]) -> Callable[[nn.Module, Sequence[Mapping]], dict]:
    def run(model: nn.Module, inputs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        from torchao.quantization import quantize_

        made = config()
        start = _now()
        quantize_(model, made)
        return {"quantize_": _now() - start}

    return run


def _peer_configs() -> dict[str, Callable[[nn.Module, Sequence[Mapping]], dict]]:
    from peers import _int4_weight_only, _int8_dynamic, _int8_weight_only, _intx4_weight_only

    return {
        "quanto-w8a16": _quanto("qint8"),
        "quanto-w4a16": _quanto("qint4"),
        "quanto-w8a8": _quanto("qint8", "qint8"),
        "torchao-w8a16": _torchao(_int8_weight_only),
        "torchao-w8a8": _torchao(_int8_dynamic),
        "torchao-w4a16": _torchao(_int4_weight_only),
        "torchao-w4a16-intx": _torchao(_intx4_weight_only),
    }


def quantize_rows(
    spec: ModelSpec, presets: Sequence[str], peers: Sequence[str], samples: int, latent: int,
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[dict[str, Any]]:
    """One row per method: phase times, total, weight bytes after; failures carry their error."""
    peer_fns = _peer_configs()
    unknown = [p for p in peers if p not in peer_fns]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {', '.join(peer_fns)}")
    rows = []
    for method in [*presets, *peers]:
        torch.manual_seed(0)
        model = build(spec, device="cpu", dtype=torch.float32)
        inputs = calibration_inputs(model, samples, latent)
        row: dict[str, Any] = {"method": method, "library": "diffq" if method in presets else method.split("-")[0]}
        progress(f"{method}: quantizing")
        try:
            phases = time_diffq(model, method, inputs) if method in presets else peer_fns[method](model, inputs)
            row.update(phases=phases, seconds=sum(phases.values()), weight_bytes=stored_bytes(model), status="ok")
        except Exception as err:  # a configuration that cannot run is listed with its error
            row.update(phases={}, seconds=None, weight_bytes=None, status=" ".join(f"{type(err).__name__}: {err}".split()))
        done = row["status"] if row["seconds"] is None else f"{row['seconds']:.1f} s"
        progress(f"{method}: {done}")
        rows.append(row)
        del model, inputs
        gc.collect()
    return rows


# --- CUDA: latency per step -------------------------------------------------------------------------

CUDA_SHAPES = {  # (latent side, text tokens, batch) of a 1024x1024 image
    "sdxl": (128, 77, 2),
    "flux": (128, 512, 1),
}


def step_latency(model: nn.Module, kwargs: Mapping[str, Any], reps: int, warmup: int = 2) -> float:
    """Median wall time of one denoiser call in milliseconds (CUDA synchronised)."""
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            start = _now()
            model(**kwargs)
            if i >= warmup:
                times.append((_now() - start) * 1e3)
    return statistics.median(times)


def latency_rows(
    specs: Mapping[str, ModelSpec], presets: Sequence[str], *, device: str, dtype: torch.dtype, reps: int,
    calibration_samples: int, shapes: Mapping[str, tuple[int, int, int]] = CUDA_SHAPES,
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[dict[str, Any]]:
    """For each model: fp latency per step, then each preset's (quantized on ``device``)."""
    import diffq

    rows = []
    for key, spec in specs.items():
        latent, tokens, batch = shapes[key]
        fp_ms = None
        for method in ["fp16" if dtype == torch.float16 else str(dtype).removeprefix("torch."), *presets]:
            torch.manual_seed(0)
            row: dict[str, Any] = {"model": spec.label, "method": method}
            try:
                model = build(spec, device=device, dtype=dtype)
                if method in presets:
                    calib = [example_inputs(model, latent=latent, text_tokens=tokens, batch=1, timestep=t)
                             for t in ([999.0, 1.0] * calibration_samples)[:calibration_samples]]
                    start = _now()
                    diffq.quantize(model, method, calibration=calib, progress=False)
                    row["quantize_seconds"] = _now() - start
                kwargs = example_inputs(model, latent=latent, text_tokens=tokens, batch=batch)
                ms = step_latency(model, kwargs, reps)
                fp_ms = fp_ms if method in presets else ms
                row.update(ms=ms, speedup=None if fp_ms is None else fp_ms / ms, weight_bytes=stored_bytes(model),
                           status="ok")
            except Exception as err:
                row.update(ms=None, speedup=None, weight_bytes=None, status=" ".join(f"{type(err).__name__}: {err}".split()))
            done = row["status"] if row["ms"] is None else f"{row['ms']:.1f} ms"
            progress(f"{spec.label} {method}: {done}")
            rows.append(row)
            model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


# --- report -----------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    cpu = data["cpu"]
    phase_names = list(dict.fromkeys(p for r in cpu["rows"] for p in r["phases"]))
    table = markdown(
        ["method", "library", *[f"{p} s" for p in phase_names], "total s", "weights (MiB)", "status"],
        [[r["method"], r["library"], *[None if p not in r["phases"] else f"{r['phases'][p]:.1f}" for p in phase_names],
          None if r["seconds"] is None else f"{r['seconds']:.1f}", mib(r["weight_bytes"], 1),
          "ok" if r["status"] == "ok" else "failed (below)"] for r in cpu["rows"]],
    )
    parts = [
        f"**Time to quantize a {cpu['model']} on the CPU** (`python benchmarks/speed.py`): "
        f"{cpu['params']:,} parameters, float32, random weights; {cpu['threads']} torch threads. "
        f"Calibration: {cpu['calibration_samples']} example input(s) at a {cpu['latent_size']}x{cpu['latent_size']} "
        "latent with 77 text tokens (one forward pass each). Mixed precision allocates on synthetic "
        "sensitivity scores (its sensitivity analysis needs a pipeline and is not timed here).",
        table,
    ]
    failed = [f"- `{r['method']}`: {r['status']}" for r in cpu["rows"] if r["status"] != "ok"]
    if failed:
        parts.append("Configurations that did not run here, with the error each gave:\n\n" + "\n".join(failed))
    cuda = data["cuda"]
    if cuda is None:
        parts.append("**Denoiser latency per step at SDXL and Flux sizes: not measured — no CUDA device on this "
                     "machine.** Run this script on a GPU for that table.")
    else:
        parts.append(f"**Denoiser latency per step on {data['machine']['cuda_device']}** (1024x1024: SDXL UNet "
                     "batch 2 at a 128x128 latent with 77 tokens; Flux.1 transformer batch 1 with 4096 image and "
                     f"512 text tokens), float16, random weights, median of {cuda['reps']} calls after warm-up.")
        parts.append(markdown(
            ["model", "method", "ms / step", "x fp16", "weights (MiB)", "quantize s", "status"],
            [[r["model"], r["method"], None if r["ms"] is None else f"{r['ms']:.2f}",
              None if r["speedup"] is None else f"{r['speedup']:.2f}", mib(r["weight_bytes"], 1),
              None if r.get("quantize_seconds") is None else f"{r['quantize_seconds']:.1f}",
              r["status"]] for r in cuda["rows"]],
        ))
    parts.append("Wall times on a shared machine vary with its load; compare rows of one run. " + machine_line(data["machine"]))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(CPU_PRESETS), help="diffq presets to time on the CPU; 'none'")
    parser.add_argument("--peers", default=",".join(CPU_PEERS), help="peer configurations to time; 'none'")
    parser.add_argument("--calibration-samples", type=int, default=2,
                        help="example inputs diffq (and quanto w8a8) calibrate on (default: 2)")
    parser.add_argument("--latent-size", type=int, default=32, help="calibration latent side (default: 32, 256 px)")
    parser.add_argument("--unet", choices=sorted(UNETS), default="sd15", help="sd15 (default), or tiny for a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cuda-models", default=",".join(CUDA_MODELS), help="models to time on CUDA; 'none'")
    parser.add_argument("--cuda-presets", default=",".join(CUDA_PRESETS), help="diffq presets to time on CUDA")
    parser.add_argument("--cuda-calibration-samples", type=int, default=2, help="calibration inputs on CUDA")
    parser.add_argument("--reps", type=int, default=10, help="timed denoiser calls per CUDA measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "speed", help="output folder")
    args = parser.parse_args(argv)

    def names(value: str) -> list[str]:
        return [] if value == "none" else [v for v in value.split(",") if v]

    if args.calibration_samples < 1 or args.cuda_calibration_samples < 1:
        parser.error("calibration samples must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        print(f"[speed] {msg}", file=sys.stderr, flush=True)

    spec = UNETS[args.unet]
    params = sum(p.numel() for p in build(spec).parameters())
    cpu_rows = quantize_rows(spec, names(args.presets), names(args.peers), args.calibration_samples,
                             args.latent_size, progress=say)
    cpu = {"model": spec.label, "params": params, "threads": torch.get_num_threads(),
           "calibration_samples": args.calibration_samples, "latent_size": args.latent_size, "rows": cpu_rows}
    cuda = None
    if torch.cuda.is_available():
        cuda_models = names(args.cuda_models)
        specs = {key: MODELS[key] for key in cuda_models}
        cuda = {"reps": args.reps, "rows": latency_rows(
            specs, names(args.cuda_presets), device="cuda", dtype=torch.float16, reps=args.reps,
            calibration_samples=args.cuda_calibration_samples, progress=say)}
    else:
        say("no CUDA device: skipping the latency table")
    data = {"machine": machine(), "cpu": cpu, "cuda": cuda}
    text = render(data)
    print(text)
    paths = write_results(args.out, text, data)
    say(f"wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
