"""The prepared GPU command (``benchmarks/gpu_check.sh``): its dry run in CI, and the kernel tests it
runs natively on CUDA.

Without a GPU, ``gpu_check.sh --dry-run`` must pass: it rehearses every phase on the CPU (the GPU
image's packages, diffq staged and imported as there, the GPU tests collected, ``kernel_speed.py`` and
``gpu_step.py`` in their dry-run modes, the report merged). On a GPU (``gpu_check.sh``'s ``tests``
phase, no ``TRITON_INTERPRET``), the CUDA tests below run the compiled Triton kernels through the
``diffq::quantized_linear`` op on every case of ``tests/test_kernels.py`` and at real SDXL/Flux
layer shapes, against the float64 reference and the error bound ``kernel_cases`` derives.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    CASES,
    IMPLICIT_GEMM_CASES,
    Case,
    ConvCase,
    conv_expected_and_tolerance,
    conv_inputs,
    expected_and_tolerance,
    make_inputs,
)

REPO = Path(__file__).resolve().parent.parent
PHASES = ("env", "tests", "kernels", "step", "report")
CUDA = torch.cuda.is_available()


def test_gpu_check_dry_run_lists_every_phase(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets up what it needs
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for name in PHASES:
        assert f"== phase {name}: exit 0" in out, f"phase {name} missing or failed:\n{out[-4000:]}"
    assert "gpu_step: " in out and "checks passed" in out
    assert "kernel_speed.py dry run:" in out
    assert "tests collected" in out or "test_kernels_natively" in out
    report = (tmp_path / "results.md").read_text()
    assert "dry run" in report and all(f"| {name} | ok |" in report for name in PHASES[:-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "results.json", "results.md"]


def test_gpu_check_rejects_an_unknown_option():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--bogus"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_simulated_image_refuses_an_import_it_lacks(tmp_path):
    pytest.importorskip("gradio", reason="needs a package that the GPU image lacks installed here")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_env
    finally:
        sys.path.pop(0)
    finder = gpu_env._OutsideImage(ours=[str(tmp_path)])
    sys.modules.pop("gradio", None)
    sys.meta_path.insert(0, finder)
    try:
        code = compile("import gradio", str(tmp_path / "uses_gradio.py"), "exec")
        with pytest.raises(ModuleNotFoundError, match="GPU image lacks"):
            exec(code, {})
        exec(compile("import json", str(tmp_path / "uses_json.py"), "exec"), {})  # the standard library is there
    finally:
        sys.meta_path.remove(finder)


# --- native kernels (CUDA only; gpu_check.sh's tests phase) ---------------------------------------------

# Real layer shapes (tokens, out, in) of SDXL (float16) and Flux.1 (bfloat16), each preset's kernel path;
# the feed-forward ones at 1024 tokens, so the float64 reference stays within seconds.
REAL = [
    Case("sdxl-ff-w8a8-static", (4096,), 5120, 1280, 8, None, False, 8, static=True, bias=True),
    Case("sdxl-attn-w4a8-static", (4096,), 1280, 1280, 4, 64, False, 8, static=True, bias=True),
    Case("flux-attn-w4a4-r32", (4096,), 3072, 3072, 4, 64, False, 4, act_group=64, rank=32, bias=True,
         smooth=True, dtype=torch.bfloat16),
    Case("flux-ff-w4a8-static", (1024,), 12288, 3072, 4, 64, False, 8, static=True, bias=True, dtype=torch.bfloat16),
    Case("flux-ff-w4a16", (1024,), 3072, 12288, 4, 64, False, None, bias=True, dtype=torch.bfloat16),
]


def _on(device: str, x, qweight, w_scale, w_zero, kw):
    move = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
    return move(x), move(qweight), move(w_scale), move(w_zero), {k: move(v) for k, v in kw.items()}


@pytest.mark.skipif(not CUDA, reason="the native kernel run needs CUDA (gpu_check.sh runs it on the GPU)")
@pytest.mark.parametrize("case", CASES + REAL, ids=lambda c: c.name)
def test_kernels_natively(case):
    from diffq.kernels import dispatch

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the native run must not use the interpreter"
    x, qweight, w_scale, w_zero, kw = _on("cuda", *make_inputs(case))
    assert dispatch.unsupported_reason("quantized_linear", x, qweight, w_scale, w_zero, **kw) is None
    y = dispatch.quantized_linear(x, qweight, w_scale, w_zero, **kw)
    torch.cuda.synchronize()
    assert y.shape == (*case.lead, case.n) and y.dtype == x.dtype and y.device.type == "cuda"
    expected, tol = expected_and_tolerance(x, qweight, w_scale, w_zero, kw)  # float64, on the GPU
    worst = float(((y.reshape(-1, case.n).double() - expected).abs() / tol).max())
    assert worst <= 1.0, f"error exceeds the bound by a factor {worst:.3g}"


# SDXL's 3x3 convolutions at 1024x1024 (batch 2, the 64x64 latent level with 640 channels), each activation
# scheme: static int8 (the autotuned one), W4A4's dynamic scales with smoothing and a rank-32 branch, the
# stride-2 downsampler.
REAL_CONVS = [
    ConvCase("sdxl-conv3x3-w8a8-static", (2, 640, 64, 64), 640, (3, 3), (1, 1), (1, 1), 8, None, 8, bias=True),
    ConvCase("sdxl-conv3x3-w4a4-r32", (2, 640, 64, 64), 640, (3, 3), (1, 1), (1, 1), 4, 64, 4, rank=32, bias=True,
             smooth=True, dynamic=True, act_group=64),
    ConvCase("sdxl-down-w4a8-static", (2, 640, 64, 64), 640, (3, 3), (2, 2), (1, 1), 4, 64, 8, bias=True),
]
TUNED_CONV = "sdxl-conv3x3-w8a8-static"


@pytest.mark.skipif(not CUDA, reason="the native kernel run needs CUDA (gpu_check.sh runs it on the GPU)")
@pytest.mark.parametrize("case", IMPLICIT_GEMM_CASES + REAL_CONVS, ids=lambda c: c.name)
def test_convolutions_natively(case, monkeypatch):
    """The implicit-GEMM convolutions through the op's CUDA kernel, within the float64 bound; one real shape
    autotunes, the others run the fixed tiles (tuning each would not fit the phase's time)."""
    from diffq.kernels import dispatch

    if case.name != TUNED_CONV:
        monkeypatch.setenv("DIFFQ_AUTOTUNE", "0")
    x, qweight, w_scale, w_zero, kw = _on("cuda", *conv_inputs(case))
    assert dispatch.unsupported_reason("quantized_conv2d", x, qweight, w_scale, w_zero, **kw) is None
    y = dispatch.quantized_conv2d(x, qweight, w_scale, w_zero, **kw)
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and y.dtype == x.dtype and y.shape[:2] == (x.shape[0], case.out)
    expected, tol = conv_expected_and_tolerance(x, qweight, w_scale, w_zero, kw)  # float64, on the GPU
    err = (y.permute(0, 2, 3, 1).reshape(-1, case.out).double() - expected).abs()
    worst = float((err / tol.clamp_min(1e-300)).max())
    assert bool((err <= tol).all()), f"error exceeds the bound by a factor {worst:.3g}"
