"""One denoiser step on the CPU: float32 and bfloat16 against diffq's presets and the peers' CPU
paths, as ratios to float32 at the same thread count, in one run on the same inputs.

    python benchmarks/cpu.py [--models sd15,flux] [--presets w8a8,w4a8,w4a16] [--peers torchao-w8a8,...|none]
        [--threads 1,2] [--reps 3] [--flux-depth 2] [--out benchmarks/results/cpu]

Models: a ``UNet2DConditionModel`` of SD 1.5's published config (``memory.SD15_UNET``, random
weights) at a 32x32 latent, batch 2, 77 text tokens; and a ``FluxTransformer2DModel`` of Flux.1's
published widths (``memory.FLUX_DEV``) at reduced depth (``--flux-depth`` double and single
blocks), 256 image tokens (a 32x32 latent), 64 text tokens, batch 1. Each method builds the model
afresh (same seed), quantizes it (diffq: calibrated on 2 example inputs, as ``speed.py`` does),
then times one call per thread count: the median of ``--reps`` after one warm-up. diffq's rows
run its CPU kernels (``torch._int_mm``); ``--reference`` adds each preset again with
``DIFFQ_KERNELS=reference`` (the dequantize-then-float path every quantized layer ran before).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results
from memory import FLUX_DEV, MODELS, ModelSpec, build, stored_bytes
from speed import _peer_configs, example_inputs, step_latency, time_diffq

SHAPES = {"sd15": (32, 77, 2), "flux": (32, 64, 1)}  # latent side, text tokens, batch


def flux_reduced(depth: int) -> ModelSpec:
    config = {**FLUX_DEV, "num_layers": depth, "num_single_layers": depth}
    return ModelSpec(f"Flux.1 widths, {depth}+{depth} blocks", "FluxTransformer2DModel", config, False)


def _threads(count: int) -> None:
    torch.set_num_threads(count)


def method_rows(key: str, spec: ModelSpec, method: str, threads: Sequence[int], reps: int) -> list[dict[str, Any]]:
    """Build, quantize (unless float), and time one call per thread count."""
    latent, tokens, batch = SHAPES[key]
    dtype = torch.bfloat16 if method == "bfloat16" else torch.float32
    preset, forced_reference = method.removesuffix(" (reference)"), method.endswith(" (reference)")
    torch.manual_seed(0)
    model = build(spec, device="cpu", dtype=dtype).eval()
    _threads(max(threads))
    peers = _peer_configs()
    if preset in peers:
        calib = [example_inputs(model, latent=latent, text_tokens=tokens, batch=1, timestep=t) for t in (999.0, 1.0)]
        peers[preset](model, calib)
    elif preset not in ("float32", "bfloat16"):
        calib = [example_inputs(model, latent=latent, text_tokens=tokens, batch=1, timestep=t) for t in (999.0, 1.0)]
        time_diffq(model, preset, calib)
    kwargs = example_inputs(model, latent=latent, text_tokens=tokens, batch=batch,
                            generator=torch.Generator().manual_seed(1))
    rows = []
    previous = os.environ.get("DIFFQ_KERNELS")
    if forced_reference:
        os.environ["DIFFQ_KERNELS"] = "reference"
    try:
        for count in threads:
            _threads(count)
            ms = step_latency(model, kwargs, reps, warmup=1)
            rows.append({"model": spec.label, "method": method, "threads": count, "ms": ms,
                         "weight_bytes": stored_bytes(model)})
    finally:
        if forced_reference:
            os.environ.pop("DIFFQ_KERNELS") if previous is None else os.environ.__setitem__("DIFFQ_KERNELS", previous)
    del model
    gc.collect()
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["model"], r["threads"]): r["ms"] for r in rows if r["method"] == "float32" and r.get("ms")}
    for r in rows:
        fp = base.get((r["model"], r["threads"]))
        r["speedup"] = None if fp is None or not r.get("ms") else fp / r["ms"]


def render(data: dict[str, Any]) -> str:
    rows = [[r["model"], r["method"], r["threads"], None if r.get("ms") is None else f"{r['ms']:.0f}",
             None if r.get("speedup") is None else f"{r['speedup']:.2f}×", mib(r.get("weight_bytes"), 0),
             r.get("status", "ok")] for r in data["rows"]]
    return (f"**One denoiser step on the CPU** (`{data['command']}`): milliseconds (median of {data['reps']}) and "
            "speed-up over float32 at the same thread count.\n\n"
            + markdown(["model", "method", "threads", "ms", "vs float32", "weights (MiB)", "status"], rows)
            + f"\n\n{machine_line(data['machine'])}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,flux")
    parser.add_argument("--presets", default="w8a8,w4a8,w4a16,w8a16,w4a4")
    parser.add_argument("--peers", default="torchao-w8a8,torchao-w8a16,quanto-w8a8,quanto-w8a16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--flux-depth", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also time each preset on the reference kernels")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "cpu")
    args = parser.parse_args(argv)

    def names(value: str) -> list[str]:
        return [] if value in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]

    specs = {"sd15": MODELS["sd15"], "flux": flux_reduced(args.flux_depth)}
    threads = [int(t) for t in names(args.threads)]
    presets = names(args.presets)
    methods = ["float32", "bfloat16", *presets, *(f"{p} (reference)" for p in presets if args.reference),
               *names(args.peers)]
    rows: list[dict[str, Any]] = []
    for key in names(args.models):
        for method in methods:
            print(f"[cpu] {key} {method}", file=sys.stderr, flush=True)
            try:
                rows += method_rows(key, specs[key], method, threads, args.reps)
            except Exception as err:  # a peer that cannot run here is a row that says why
                status = " ".join(f"{type(err).__name__}: {err}".split())[:160]
                rows += [{"model": specs[key].label, "method": method, "threads": t, "ms": None, "status": status}
                         for t in threads]
            add_ratios(rows)
            print(render({"rows": rows[-len(threads):], "reps": args.reps, "command": "", "machine": machine()}),
                  file=sys.stderr, flush=True)
    add_ratios(rows)
    command = "python benchmarks/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"rows": rows, "reps": args.reps, "command": command.strip(), "machine": machine()}
    write_results(args.out, render(data), data)
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
