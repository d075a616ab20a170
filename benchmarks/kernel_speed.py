"""Quantized linear kernels against ``torch.matmul`` at the layer shapes of SDXL and Flux.

    python benchmarks/kernel_speed.py [--tokens 4096] [--rank 32] [--budget SECONDS] [--out FILE] [--results DIR]
    python benchmarks/kernel_speed.py --dry-run     # every path once at a tiny shape on the CPU: seconds

On CUDA every preset's path through :func:`diffq.kernels.triton_ops.quantized_linear_triton`
(activation kernel + GEMM) is timed with ``triton.testing.do_bench`` at the token count of a
1024x1024 image (SDXL: 4096 tokens at the 64x64 attention level of the 128x128 latent; Flux:
4096 image tokens), with TFLOP/s (``2 M N K / t``) and the speedup over a 16-bit ``torch.matmul``
of the same shape. The same table times PyTorch's own low-precision GEMMs at each shape, on operands
quantized beforehand (the GEMM alone, no activation quantization): ``torch._int_mm`` (int8 x int8 ->
int32, cuBLAS) and ``torch._scaled_mm`` on float8 e4m3 operands with one scale per tensor and with
one scale per row of each operand (row-wise; bfloat16 output), where the GPU has fp8 (sm_89+). A
second table shows what the rank-``r`` low-rank branch of ``w4a4`` costs fused into the kernels,
against adding it with two separate matmuls. A third times SDXL's 3x3 convolutions (batch 2 at
1024x1024: 320 channels at 128x128, 640 at 64x64, 1280 at 32x32) through
:func:`diffq.kernels.triton_ops.quantized_conv2d_triton` (the implicit-GEMM kernel) against a
16-bit ``F.conv2d`` (cuDNN). ``--budget`` caps the run: shapes that do not fit are
listed as skipped. ``--results DIR`` writes ``results.md`` and ``results.json`` there.

Without CUDA it says so and times the pure-torch reference path (what CPU users run) on small
shapes instead, against a float32 ``torch.matmul``; that run takes well under two minutes.
``--dry-run`` runs every path (the kernel's, each torch GEMM, the low-rank branch) once at a tiny
shape on the CPU, with the reference standing in for the Triton kernels, and checks the CUDA-only
APIs exist.
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
# (model, batch, channels, latent size) of 3x3, stride-1, channels -> channels convolutions.
CONV_SHAPES = [("SDXL", 2, 320, 128), ("SDXL", 2, 640, 64), ("SDXL", 2, 1280, 32)]
CPU_CONV_SHAPES = [("SDXL", 1, 320, 16)]


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


def int_mm(x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``torch._int_mm`` on int8 operands made from ``x`` and ``w`` beforehand: the int8 GEMM alone."""
    xq = _int8(x)
    wt = _int8(w).t()  # [K, N], column-major, as cuBLAS's int8 GEMM takes it
    return lambda: torch._int_mm(xq, wt)


def _int8(t: torch.Tensor) -> torch.Tensor:
    scale = t.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(t.float() / scale).clamp(-127, 127).to(torch.int8)


def scaled_mm(x: torch.Tensor, w: torch.Tensor, rowwise: bool) -> Callable[[], torch.Tensor]:
    """``torch._scaled_mm`` on float8 e4m3 operands made beforehand, one scale per tensor or per row
    (``rowwise``: scales ``[M, 1]`` and ``[1, N]``, bfloat16 output, as PyTorch requires)."""
    fp8 = torch.float8_e4m3fn
    dims = -1 if rowwise else None
    sx = _fp8_scale(x, dims)
    sw = _fp8_scale(w, dims)
    xq = (x.float() / sx).to(fp8)
    wt = (w.float() / sw).to(fp8).t()  # [K, N], column-major
    scale_b = sw.t() if rowwise else sw
    out = torch.bfloat16 if rowwise else x.dtype
    return lambda: torch._scaled_mm(xq, wt, scale_a=sx, scale_b=scale_b, out_dtype=out)


def _fp8_scale(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    amax = t.float().abs().amax() if dim is None else t.float().abs().amax(dim=dim, keepdim=True)
    return (amax.clamp_min(1e-8) / torch.finfo(torch.float8_e4m3fn).max).float()


TORCH_GEMMS: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]]] = [
    ("torch._int_mm int8", int_mm),
    ("torch._scaled_mm fp8 e4m3 tensor-wise", lambda x, w: scaled_mm(x, w, rowwise=False)),
    ("torch._scaled_mm fp8 e4m3 row-wise", lambda x, w: scaled_mm(x, w, rowwise=True)),
]


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


class Deadline:
    """Seconds since start against a budget (``None``: no limit); remembers what it skipped."""

    def __init__(self, budget: float | None) -> None:
        self.budget, self.start, self.skipped = budget, time.perf_counter(), []

    def over(self, what: str) -> bool:
        if self.budget is not None and time.perf_counter() - self.start > self.budget:
            self.skipped.append(what)
            return True
        return False


def gemm_rows(shapes, tokens: int, dtype: torch.dtype, device: str, timer, kernel, deadline: Deadline | None = None,
              torch_gemms: bool = False) -> list[list[str]]:
    """One row per shape and path: time, TFLOP/s and speedup over the 16-bit (CPU: fp32) matmul;
    with ``torch_gemms``, PyTorch's int8 and fp8 GEMMs too (a row says so where one cannot run)."""
    rows = []
    deadline = deadline or Deadline(None)
    for model, K, N in shapes:
        if deadline.over(f"GEMM {model} {tokens}x{K}x{N}"):
            continue
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
        for name, make in TORCH_GEMMS if torch_gemms else []:
            try:
                ms = timer(make(x, w))
            except (RuntimeError, TypeError, AttributeError) as exc:  # e.g. no fp8 before sm_89
                rows.append([model, f"{tokens}x{K}x{N}", name, f"unavailable: {str(exc).splitlines()[0][:120]}",
                             "–", "–"])
                continue
            rows.append([model, f"{tokens}x{K}x{N}", name, f"{ms:.3f}", f"{tflops(tokens, K, N, ms):.2f}",
                         f"{base / ms:.2f}"])
    return rows


def lowrank_rows(shapes, tokens: int, rank: int, dtype: torch.dtype, device: str, timer, kernel,
                 deadline: Deadline | None = None) -> list[list[str]]:
    """The low-rank branch's cost: fused into the kernels vs two separate matmuls and an add."""
    rows = []
    deadline = deadline or Deadline(None)
    for model, K, N in shapes:
        if deadline.over(f"low-rank {model} {tokens}x{K}x{N}"):
            continue
        x = torch.randn(tokens, K, device=device).to(dtype)
        kw = layer(LOWRANK_PRESET, K, N, rank, dtype, device)
        plain = {k: v for k, v in kw.items() if k not in ("lowrank_down", "lowrank_up")}
        without = timer(call(kernel, x, plain))
        fused = timer(call(kernel, x, kw))
        separate = without + timer(separate_lowrank(x, kw))  # the branch added outside the kernels
        rows.append([model, f"{tokens}x{K}x{N}", f"{without:.3f}", f"{fused:.3f} ({100 * (fused / without - 1):+.0f}%)",
                     f"{separate:.3f} ({100 * (separate / without - 1):+.0f}%)"])
    return rows


def conv_layer(preset: Preset, channels: int, dtype: torch.dtype, device: str) -> dict:
    """A quantized 3x3 ``channels -> channels`` convolution of ``preset`` (dynamic activation scales
    per pixel and group of channels, smoothing per channel)."""
    kw = layer(preset, channels * 9, channels, 0, dtype, device)
    kw.pop("in_features")
    if kw["act_scale"] is not None:
        kw["act_scale"] = kw["act_scale"].reshape(1)
    kw.update(weight_shape=(channels, channels, 3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
              smooth=(torch.rand(channels, device=device) + 0.5).to(dtype) if preset.smooth else None)
    return kw


def conv_rows(shapes, dtype: torch.dtype, device: str, timer, kernel, deadline: Deadline | None = None
              ) -> list[list[str]]:
    """One row per convolution shape and preset: time, TFLOP/s
    (``2 M N K`` with ``M`` output pixels, ``K = 9 C``) and speedup over ``F.conv2d`` in ``dtype``."""
    rows = []
    deadline = deadline or Deadline(None)
    for model, batch, channels, size in shapes:
        what = f"{batch}x{channels}x{size}x{size} 3x3"
        if deadline.over(f"conv {model} {what}"):
            continue
        x = torch.randn(batch, channels, size, size, device=device).to(dtype)
        w = torch.randn(channels, channels, 3, 3, device=device).to(dtype) * 0.02
        M, K = batch * size * size, 9 * channels
        base = timer(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1))
        rows.append([model, what, f"F.conv2d {str(dtype).removeprefix('torch.')}", f"{base:.3f}",
                     f"{tflops(M, K, channels, base):.2f}", "1.00"])
        for preset in PRESETS:
            ms = timer(call(kernel, x, conv_layer(preset, channels, dtype, device)))
            rows.append([model, what, preset.name, f"{ms:.3f}", f"{tflops(M, K, channels, ms):.2f}", f"{base / ms:.2f}"])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no CUDA"


def run(tokens: int, rank: int, budget: float | None = None) -> tuple[str, dict]:
    """Time everything; the report as markdown, and its tables as data."""
    if torch.cuda.is_available():
        from diffq.kernels.triton_ops import quantized_conv2d_triton, quantized_linear_triton

        device, dtype, shapes, timer, kernel = "cuda", torch.float16, SHAPES, gpu_time, quantized_linear_triton
        conv_shapes, conv_kernel = CONV_SHAPES, quantized_conv2d_triton
        title = f"Triton kernels on {machine()}, {tokens} tokens, float16 activations"
        with_branch = "fused ms"
    else:
        print("No CUDA device: timing the pure-torch reference path on small shapes instead.", file=sys.stderr)
        tokens = min(tokens, CPU_TOKENS)
        torch.set_num_threads(1)  # steadier on a shared machine; the table says so
        device, dtype, shapes, timer, kernel = "cpu", torch.float32, CPU_SHAPES, cpu_time, reference.quantized_linear
        conv_shapes, conv_kernel = CPU_CONV_SHAPES, reference.quantized_conv2d
        title = f"Reference path (no CUDA) on {machine()}, 1 thread, {tokens} tokens, float32 activations"
        with_branch = "reference with branch ms"
    torch.manual_seed(0)
    deadline = Deadline(budget)
    gemm = gemm_rows(shapes, tokens, dtype, device, timer, kernel, deadline, torch_gemms=device == "cuda")
    lowrank = lowrank_rows(shapes, tokens, rank, dtype, device, timer, kernel, deadline)
    conv = conv_rows(conv_shapes, dtype, device, timer, conv_kernel, deadline)
    gemm_header = ["model", "M x K x N", "path", "ms", "TFLOP/s", "x matmul"]
    lowrank_header = ["model", "M x K x N", f"{LOWRANK_PRESET.name} ms", with_branch, "+ separate matmuls ms"]
    parts = [
        f"**{title}** (`python benchmarks/kernel_speed.py`)",
        markdown(gemm_header, gemm),
        f"Low-rank branch, rank {rank}, on {LOWRANK_PRESET.name}:",
        markdown(lowrank_header, lowrank),
        ("3x3 convolutions (implicit GEMM; W4A4's dynamic scales: its input fake-quantized, then the 16-bit "
         "weight-only GEMM):"),
        markdown(gemm_header, conv),
    ]
    if device == "cuda":
        parts.insert(2, "torch._int_mm / torch._scaled_mm rows: operands quantized beforehand, the GEMM alone "
                        "(diffq's rows include quantizing the activations).")
    if deadline.skipped:
        parts.append(f"Skipped (over the {budget:.0f} s budget): {', '.join(deadline.skipped)}.")
    data = {"title": title, "tokens": tokens, "rank": rank, "gemm": {"header": gemm_header, "rows": gemm},
            "lowrank": {"header": lowrank_header, "rows": lowrank}, "conv": {"header": gemm_header, "rows": conv},
            "skipped": deadline.skipped}
    return "\n\n".join(parts), data


def dry_run() -> str:
    """Every path once at a tiny shape on the CPU (the reference for the kernels), and the CUDA-only
    APIs looked up; raises on the first failure."""
    import triton.testing  # noqa: F401  (gpu_time's timer)

    for name in ("_int_mm", "_scaled_mm", "float8_e4m3fn"):
        getattr(torch, name)
    shapes = [(model, 64, 64) for model, _, _ in SHAPES[:1]]
    gemm = gemm_rows(shapes, 32, torch.float32, "cpu", _once, reference.quantized_linear, torch_gemms=True)
    lowrank = lowrank_rows(shapes, 32, 16, torch.float32, "cpu", _once, reference.quantized_linear)
    conv = conv_rows([("SDXL", 1, 32, 8)], torch.float32, "cpu", _once, reference.quantized_conv2d)
    notes = [f"{r[2]}: {r[3]}" for r in gemm if r[3].startswith("unavailable")]  # fp8 on a CPU build without it
    return (f"kernel_speed.py dry run: {len(SHAPES)} shapes, {len(PRESETS)} presets; {len(gemm)} GEMM rows and "
            f"{len(lowrank)} low-rank rows ran once at 32x64x64 on the CPU, {len(conv)} convolution rows at 1x32x8x8"
            + (f"; not runnable on this CPU (runs on CUDA): {'; '.join(notes)}" if notes else ""))


def _once(fn: Callable[[], object]) -> float:
    """The dry run's timer: one call, a dummy 1 ms."""
    fn()
    return 1.0


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (M); CPU caps it at 256")
    parser.add_argument("--rank", type=int, default=32, help="rank of the low-rank branch")
    parser.add_argument("--budget", type=float, help="seconds; shapes past it are skipped (default: no limit)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--results", type=Path, help="write results.md and results.json into this folder")
    parser.add_argument("--dry-run", action="store_true", help="every path once at a tiny shape on the CPU")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(dry_run())
        return
    report, data = run(args.tokens, args.rank, args.budget)
    print(report)
    if args.out:
        write_atomic(args.out, report + "\n")
    if args.results:
        from common import machine, machine_line, write_results

        info = machine()
        write_results(args.results, f"{report}\n\n{machine_line(info)}", {"machine": info, **data})


if __name__ == "__main__":
    main()
