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
run its CPU kernels (``torch._int_mm``); ``--reference`` times each preset's model again with
``DIFFQ_KERNELS=reference`` (the dequantize-then-float path every quantized layer ran before).

Peers: optimum-quanto and torchao as ``speed.py`` runs them, SDNQ's ``sdnq_post_load_quant``
(no calibration; convolutions included, its default skip list, its int8 matmul path on or off)
and NVIDIA ModelOpt's ``mtq.quantize`` with a forward loop over the two example inputs (its
models are fake-quantized: float kernels plus quantize-dequantize nodes).
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
from speed import TINY_UNET, _peer_configs, example_inputs, step_latency, time_diffq

SHAPES = {"sd15": (32, 77, 2), "flux": (32, 64, 1), "tiny": (8, 16, 2)}  # latent side, text tokens, batch


def _sdnq(weights: str, int_matmul: bool):
    """SDNQ's post-load quantization (no calibration), convolutions included, its int8 matmul path on or off."""
    def run(model: torch.nn.Module, inputs: Sequence[dict]) -> None:
        from sdnq import sdnq_post_load_quant

        sdnq_post_load_quant(model, weights_dtype=weights, quant_conv=True, use_quantized_matmul=int_matmul,
                             use_quantized_matmul_conv=int_matmul)  # its default skip list (time embeddings, ...)

    return run


def _modelopt(config_name: str):
    """NVIDIA ModelOpt's fake-quantized model, calibrated with a forward loop over the example inputs."""
    def run(model: torch.nn.Module, inputs: Sequence[dict]) -> None:
        import modelopt.torch.quantization as mtq

        def forward_loop(m: torch.nn.Module) -> None:
            with torch.no_grad():
                for kwargs in inputs:
                    m(**kwargs)

        mtq.quantize(model, getattr(mtq, config_name), forward_loop)

    return run


def peer_configs() -> dict[str, Any]:
    """speed.py's optimum-quanto and torchao runners, plus SDNQ and ModelOpt."""
    return {
        **_peer_configs(),
        "sdnq-int8-matmul": _sdnq("int8", True),
        "sdnq-int8": _sdnq("int8", False),
        "sdnq-uint4": _sdnq("uint4", False),
        "modelopt-int8-smoothquant": _modelopt("INT8_SMOOTHQUANT_CFG"),
    }


def flux_reduced(depth: int) -> ModelSpec:
    config = {**FLUX_DEV, "num_layers": depth, "num_single_layers": depth}
    return ModelSpec(f"Flux.1 widths, {depth}+{depth} blocks", "FluxTransformer2DModel", config, False)


def _threads(count: int) -> None:
    torch.set_num_threads(count)


def method_rows(
    key: str, spec: ModelSpec, method: str, threads: Sequence[int], reps: int, reference: bool = False
) -> list[dict[str, Any]]:
    """Build, quantize (unless float), and time one call per thread count; with ``reference`` a
    diffq preset is timed again on the same model and inputs with ``DIFFQ_KERNELS=reference``."""
    latent, tokens, batch = SHAPES[key]
    dtype = torch.bfloat16 if method == "bfloat16" else torch.float32
    torch.manual_seed(0)
    model = build(spec, device="cpu", dtype=dtype).eval()
    _threads(max(threads))
    peers = peer_configs()
    if method.split("-")[0] in ("quanto", "torchao", "sdnq", "modelopt") and method not in peers:
        raise ValueError(f"unknown peer {method!r}; known: {', '.join(peers)}")
    is_diffq = method not in peers and method not in ("float32", "bfloat16")
    if method not in ("float32", "bfloat16"):
        calib = [example_inputs(model, latent=latent, text_tokens=tokens, batch=1, timestep=t) for t in (999.0, 1.0)]
        peers[method](model, calib) if method in peers else time_diffq(model, method, calib)
    kwargs = example_inputs(model, latent=latent, text_tokens=tokens, batch=batch,
                            generator=torch.Generator().manual_seed(1))
    rows = []
    for label, forced in ((method, False), *(((f"{method} (reference kernels)", True),) if reference and is_diffq else ())):
        previous = os.environ.get("DIFFQ_KERNELS")
        if forced:
            os.environ["DIFFQ_KERNELS"] = "reference"
        try:
            for count in threads:
                _threads(count)
                ms = step_latency(model, kwargs, reps, warmup=1)
                rows.append({"model": spec.label, "method": label, "threads": count, "ms": ms,
                             "weight_bytes": stored_bytes(model)})
        finally:
            if forced and previous is None:
                os.environ.pop("DIFFQ_KERNELS")
            elif forced:
                os.environ["DIFFQ_KERNELS"] = previous
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
    parser.add_argument("--models", default="sd15,flux", help="sd15, flux, or tiny (a smoke test)")
    parser.add_argument("--presets", default="w8a8,w4a8,w4a16,w8a16,w4a4")
    parser.add_argument("--peers", default="torchao-w8a8,torchao-w8a16,torchao-w4a16,quanto-w8a8,quanto-w8a16,"
                        "quanto-w4a16,sdnq-int8-matmul,sdnq-int8,sdnq-uint4,modelopt-int8-smoothquant")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--flux-depth", type=int, default=2)
    parser.add_argument("--reference", action="store_true",
                        help="also time each diffq preset on the reference kernels (same model, same inputs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "cpu")
    args = parser.parse_args(argv)

    def names(value: str) -> list[str]:
        return [] if value in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]

    specs = {"sd15": MODELS["sd15"], "flux": flux_reduced(args.flux_depth), "tiny": TINY_UNET}
    threads = [int(t) for t in names(args.threads)]
    presets = names(args.presets)
    methods = ["float32", "bfloat16", *presets, *names(args.peers)]
    rows: list[dict[str, Any]] = []
    for key in names(args.models):
        for method in methods:
            print(f"[cpu] {key} {method}", file=sys.stderr, flush=True)
            try:
                rows += method_rows(key, specs[key], method, threads, args.reps, args.reference)
            except Exception as err:  # a peer that cannot run here is a row that says why
                status = " ".join(f"{type(err).__name__}: {err}".split())[:160]
                rows += [{"model": specs[key].label, "method": method, "threads": t, "ms": None, "status": status}
                         for t in threads]
            add_ratios(rows)
            print(render({"rows": [r for r in rows if r["method"].startswith(method)], "reps": args.reps,
                          "command": "", "machine": machine()}), file=sys.stderr, flush=True)
    add_ratios(rows)
    command = "python benchmarks/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"rows": rows, "reps": args.reps, "command": command.strip(), "machine": machine()}
    write_results(args.out, render(data), data)
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
