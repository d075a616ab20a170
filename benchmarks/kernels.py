"""Quantized linear kernels against ``torch.matmul`` at the layer shapes of SDXL and Flux.

    python benchmarks/kernels.py [--tokens 4096] [--rank 32] [--out FILE]

On CUDA every preset's path through :func:`diffq.kernels.triton_ops.quantized_linear_triton`
(activation kernel + GEMM) is timed with ``triton.testing.do_bench`` at the token count of a
1024x1024 image (SDXL: 4096 tokens at the 64x64 attention level of the 128x128 latent; Flux:
4096 image tokens), with TFLOP/s (``2 M N K / t``) and the speedup over a 16-bit ``torch.matmul``
of the same shape. A second table shows what the rank-``r`` low-rank branch of ``w4a4`` costs
fused into the kernels, against adding it with two separate matmuls.

Without CUDA it says so and times the pure-torch reference path (what CPU users run) on small
shapes instead, against a float32 ``torch.matmul``; that run takes well under two minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffq.kernels import pack, reference

# (model, in_features K, out_features N): attention projections, feed-forward in/out, cross-attention.
SHAPES = [
    ("SDXL", 640, 640),
    ("SDXL", 640, 5120),
    ("SDXL", 2560, 640),
    ("SDXL", 1280, 1280),
    ("SDXL", 5120, 1280),
    ("SDXL", 2048, 1280),
    ("Flux", 3072, 3072),
    ("Flux", 3072, 12288),
    ("Flux", 12288, 3072),
]
CPU_SHAPES = [("SDXL", 640, 640), ("SDXL", 640, 5120), ("SDXL", 1280, 1280), ("Flux", 3072, 3072)]
CPU_TOKENS = 256


@dataclass(frozen=True)
class Preset:
    """The kernel settings of one diffq preset (see ``diffq.presets``)."""

    name: str
    w_bits: int
    w_group: int | None
    act_bits: int | None
    act_group: int | None = None
    static: bool = False
    smooth: bool = False


PRESETS = [
    Preset("W8A8", 8, None, 8, static=True),
    Preset("W4A8", 4, 64, 8, static=True),
    Preset("W4A4", 4, 64, 4, act_group=64, smooth=True),
    Preset("W4A16", 4, 64, None),
]
LOWRANK_PRESET = PRESETS[2]


def layer(preset: Preset, K: int, N: int, rank: int, dtype: torch.dtype, device: str) -> dict:
    """Random packed weights, scales and options of a quantized linear layer."""
    blocks = 1 if preset.w_group is None else K // preset.w_group
    codes = torch.randint(0, 2**preset.w_bits, (N, K), dtype=torch.uint8, device=device)
    kw = dict(
        qweight=pack(codes, preset.w_bits),
        w_scale=(torch.rand(N, blocks, device=device) * 0.01 + 0.005).to(dtype),
        w_zero=None,
        w_bits=preset.w_bits,
        w_code_offset=2 ** (preset.w_bits - 1),
        in_features=K,
        bias=torch.randn(N, device=device).to(dtype),
        act_bits=preset.act_bits,
        act_group_size=preset.act_group,
        act_scale=torch.tensor(0.03, device=device) if preset.static else None,
        smooth=(torch.rand(K, device=device) + 0.5).to(dtype) if preset.smooth else None,
    )
    if rank:
        kw["lowrank_down"] = (torch.randn(K, rank, device=device) / K**0.5).to(dtype)
        kw["lowrank_up"] = (torch.randn(rank, N, device=device) / rank**0.5).to(dtype)
    return kw


def call(fn: Callable[..., torch.Tensor], x: torch.Tensor, kw: dict) -> Callable[[], torch.Tensor]:
    """A no-argument closure running ``fn(x, qweight, w_scale, w_zero, **options)``."""
    args = (kw["qweight"], kw["w_scale"], kw["w_zero"])
    options = {k: v for k, v in kw.items() if k not in ("qweight", "w_scale", "w_zero")}
    return lambda: fn(x, *args, **options)


def matmul(x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The unquantized layer: ``x @ w^T``."""
    wt = w.t()
    return lambda: torch.matmul(x, wt)


def separate_lowrank(x: torch.Tensor, kw: dict) -> Callable[[], torch.Tensor]:
    """The low-rank branch as two matmuls and an add, on a precomputed output."""
    down, up = kw["lowrank_down"], kw["lowrank_up"]
    y = torch.empty(x.shape[0], up.shape[1], dtype=x.dtype, device=x.device)
    xs = x if kw["smooth"] is None else x / kw["smooth"]
    return lambda: y.add_((xs @ down) @ up)


def cpu_time(fn: Callable[[], object], reps: int = 7) -> float:
    """Best wall time of ``fn`` in milliseconds over ``reps`` calls (least disturbed by other load)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def gpu_time(fn: Callable[[], object]) -> float:
    """Median CUDA time of ``fn`` in milliseconds (``triton.testing.do_bench``)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(M: int, K: int, N: int, ms: float) -> float:
    return 2 * M * N * K / (ms * 1e-3) / 1e12


def gemm_rows(shapes, tokens: int, dtype: torch.dtype, device: str, timer, kernel) -> list[list[str]]:
    """One row per shape and path: time, TFLOP/s and speedup over the 16-bit (CPU: fp32) matmul."""
    rows = []
    for model, K, N in shapes:
        x = torch.randn(tokens, K, device=device).to(dtype)
        w = torch.randn(N, K, device=device).to(dtype)
        base = timer(matmul(x, w))
        baseline = f"torch.matmul {str(dtype).removeprefix('torch.')}"
        rows.append([model, f"{tokens}x{K}x{N}", baseline, f"{base:.3f}", f"{tflops(tokens, K, N, base):.2f}", "1.00"])
        if device == "cuda" and dtype == torch.float16:
            bf = timer(matmul(x.bfloat16(), w.bfloat16()))
            rows.append([model, f"{tokens}x{K}x{N}", "torch.matmul bfloat16", f"{bf:.3f}",
                         f"{tflops(tokens, K, N, bf):.2f}", f"{base / bf:.2f}"])
        for preset in PRESETS:
            ms = timer(call(kernel, x, layer(preset, K, N, 0, dtype, device)))
            rows.append([model, f"{tokens}x{K}x{N}", preset.name, f"{ms:.3f}", f"{tflops(tokens, K, N, ms):.2f}",
                         f"{base / ms:.2f}"])
    return rows


def lowrank_rows(shapes, tokens: int, rank: int, dtype: torch.dtype, device: str, timer, kernel) -> list[list[str]]:
    """The low-rank branch's cost: fused into the kernels vs two separate matmuls and an add."""
    rows = []
    for model, K, N in shapes:
        x = torch.randn(tokens, K, device=device).to(dtype)
        kw = layer(LOWRANK_PRESET, K, N, rank, dtype, device)
        plain = {k: v for k, v in kw.items() if k not in ("lowrank_down", "lowrank_up")}
        without = timer(call(kernel, x, plain))
        fused = timer(call(kernel, x, kw))
        separate = without + timer(separate_lowrank(x, kw))  # the branch added outside the kernels
        rows.append([model, f"{tokens}x{K}x{N}", f"{without:.3f}", f"{fused:.3f} ({100 * (fused / without - 1):+.0f}%)",
                     f"{separate:.3f} ({100 * (separate / without - 1):+.0f}%)"])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no CUDA"


def run(tokens: int, rank: int) -> str:
    """Time everything and return the report as markdown."""
    if torch.cuda.is_available():
        from diffq.kernels.triton_ops import quantized_linear_triton

        device, dtype, shapes, timer, kernel = "cuda", torch.float16, SHAPES, gpu_time, quantized_linear_triton
        title = f"Triton kernels on {machine()}, {tokens} tokens, float16 activations"
        with_branch = "fused ms"
    else:
        print("No CUDA device: timing the pure-torch reference path on small shapes instead.", file=sys.stderr)
        tokens = min(tokens, CPU_TOKENS)
        torch.set_num_threads(1)  # steadier on a shared machine; the table says so
        device, dtype, shapes, timer, kernel = "cpu", torch.float32, CPU_SHAPES, cpu_time, reference.quantized_linear
        title = f"Reference path (no CUDA) on {machine()}, 1 thread, {tokens} tokens, float32 activations"
        with_branch = "reference with branch ms"
    torch.manual_seed(0)
    gemm = gemm_rows(shapes, tokens, dtype, device, timer, kernel)
    lowrank = lowrank_rows(shapes, tokens, rank, dtype, device, timer, kernel)
    return "\n\n".join([
        f"**{title}** (`python benchmarks/kernels.py`)",
        markdown(["model", "M x K x N", "path", "ms", "TFLOP/s", "x matmul"], gemm),
        f"Low-rank branch, rank {rank}, on {LOWRANK_PRESET.name}:",
        markdown(["model", "M x K x N", f"{LOWRANK_PRESET.name} ms", with_branch, "+ separate matmuls ms"], lowrank),
    ])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (M); CPU caps it at 256")
    parser.add_argument("--rank", type=int, default=32, help="rank of the low-rank branch")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    report = run(args.tokens, args.rank)
    print(report)
    if args.out:
        write_atomic(args.out, report + "\n")


if __name__ == "__main__":
    main()
