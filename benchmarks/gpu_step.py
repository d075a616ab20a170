"""One denoiser step of SDXL's UNet and Flux.1's transformer at full size on CUDA: 16-bit against
diffq's presets, eager and ``torch.compile``d, with peak GPU memory.

    python benchmarks/gpu_step.py [--models flux,sdxl] [--variants fp,w8a8,w4a8,w4a4,w4a16]
        [--modes eager,compiled] [--compile regional|full] [--budget 270] [--reps 5] [--out DIR]
    python benchmarks/gpu_step.py --dry-run     # CPU rehearsal: seconds, nothing heavy

Models (random weights, built directly on the GPU from the published configs in ``memory.py``,
float16 for SDXL, bfloat16 for Flux): the SDXL UNet at a 1024x1024 image (128x128 latent, 77 text
tokens) and the Flux.1-dev transformer at 1024x1024 (4096 image tokens, 512 text tokens), batch 1.
Each variant builds the model afresh (same seed, so the same weights), quantizes it in place and
frees the float weights, so its peak memory is its own.

Variants, chosen to exercise the real kernels at the least quantization cost (weights round to
nearest instead of GPTQ, no smoothing vectors: same stored formats and kernels as the calibrated
presets, which only change code values and add one per-channel multiply): ``w8a8`` / ``w4a8`` are
``w8a8-rtn`` / ``w4a8-rtn`` (static per-tensor int8 activation scales, calibrated on one small input,
a 32x32 latent and 64 text tokens: diffq's calibration moves every layer's inputs to the CPU, and the
scales' values do not change the kernels' work), ``w4a4`` is ``w4a4-rtn`` with ``rank=32`` (the rank-32 low-rank branch fused into the
kernels), ``w4a16`` is ``w4a16-rtn``. ``--variants`` also takes any preset name (``w4a8-rtn``, ...).

Timing: the median of ``--reps`` calls between CUDA events after two warm-ups; ``compiled`` is
diffusers' regional compilation (``compile_repeated_blocks``: each repeated block compiled once)
or, with ``--compile full``, ``torch.compile(model)``; its first call's time is reported as
compile time. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed calls (weights +
activations) and over build + quantization. Work runs in priority order (Flux bf16 and w4a8, SDXL
fp16 and w8a8 first) and what does not fit in ``--budget`` seconds is skipped with the reason.

``--dry-run`` rehearses everything on the CPU without a GPU: builds both models at full size on
the meta device and runs a meta forward pass at the real input shapes, resolves every variant's
per-layer configs at full size, then runs the same code path as the GPU run on tiny-width models
of the same classes (quantize and an eager step for every variant; ``torch.compile`` with the
``eager`` backend, which traces the graph without generating code, for the 16-bit model and the
first quantized variant), and checks the GPU-only APIs exist.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results
from memory import FLUX_DEV, MODELS, SDXL_UNET, ModelSpec
from speed import example_inputs


@dataclass(frozen=True)
class StepModel:
    """A denoiser to time: its spec, dtype, input size and a tiny twin for the dry run."""

    key: str
    spec: ModelSpec
    dtype: torch.dtype
    latent: int  # latent side (1024x1024 image: 128)
    text_tokens: int
    tiny: ModelSpec
    tiny_latent: int
    tiny_text_tokens: int


TINY_SDXL = ModelSpec("tiny SDXL-layout UNet", "UNet2DConditionModel", dict(
    SDXL_UNET, block_out_channels=[64, 128, 128], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
    transformer_layers_per_block=[1, 1, 1], layers_per_block=1, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8, sample_size=16), True)
TINY_FLUX = ModelSpec("tiny Flux-layout transformer", "FluxTransformer2DModel", dict(
    FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
    axes_dims_rope=[4, 6, 6], joint_attention_dim=64, pooled_projection_dim=64), False)

STEP_MODELS: dict[str, StepModel] = {
    "flux": StepModel("flux", MODELS["flux"], torch.bfloat16, 128, 512, TINY_FLUX, 16, 16),
    "sdxl": StepModel("sdxl", MODELS["sdxl"], torch.float16, 128, 77, TINY_SDXL, 8, 16),
}

# label -> (preset, diffq.quantize options)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "w8a8": ("w8a8-rtn", {}),
    "w4a8": ("w4a8-rtn", {}),
    "w4a4": ("w4a4-rtn", {"rank": 32}),
    "w4a16": ("w4a16-rtn", {}),
}
# What matters most comes first: the targets (Flux W4A8, SDXL W8A8) against their baselines.
PRIORITY = [("flux", "fp"), ("flux", "w4a8"), ("sdxl", "fp"), ("sdxl", "w8a8"), ("flux", "w8a8"), ("sdxl", "w4a8"),
            ("flux", "w4a4"), ("sdxl", "w4a4"), ("flux", "w4a16"), ("sdxl", "w4a16")]
CALIBRATION = (32, 64)  # latent side and text tokens of the one input static activation scales come from
# Seconds a step needs before it is started, until the run has measured its own.
FIRST_GUESS = {"build": {"flux": 20.0, "sdxl": 10.0}, "quantize": {"flux": 60.0, "sdxl": 40.0},
               "compile": {"flux": 60.0, "sdxl": 45.0}}


def resolve_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``(preset, quantize options)`` of a variant label or a plain preset name (``fp``: none)."""
    from diffq.presets import get_preset

    if label == "fp":
        return "fp", {}
    preset, options = VARIANTS.get(label, (label, {}))
    get_preset(preset)  # raises for an unknown name
    return preset, options


def order(models: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """The (model, variant) units to run, in priority order (unlisted ones after, in the given order)."""
    wanted = [(m, v) for v in variants for m in models]
    return [u for u in PRIORITY if u in wanted] + [u for u in wanted if u not in PRIORITY]


# --- building -------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``spec``'s denoiser created directly on ``device`` in ``dtype`` (default init, seeded): the
    weights never pass through the CPU and no float32 copy exists."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    cls = getattr(diffusers, spec.cls)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls.from_config(dict(spec.config))
        model = model.to(dtype)  # buffers made in float32; it warns about float32-kept modules (it has none)
    finally:
        torch.set_default_dtype(previous)
        diffusers_logging.set_verbosity(level)
    return model.eval().requires_grad_(False)


def inputs_for(model: nn.Module, latent: int, text_tokens: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs of one step (``speed.example_inputs``), drawn on the CPU and moved to the model."""
    kwargs = example_inputs(model, latent=latent, text_tokens=text_tokens, batch=batch,
                            generator=torch.Generator().manual_seed(seed))
    return {**kwargs, "return_dict": False}


def quantize(model: nn.Module, variant: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``model`` quantized in place by diffq (calibrated on the forward kwargs ``kwargs`` where the
    preset needs it)."""
    import diffq
    from diffq.presets import get_preset

    preset, options = resolve_variant(variant)
    recipe = get_preset(preset)
    calibration = [dict(kwargs)] if recipe.needs_calibration(**_layer_overrides(options)) else None
    with torch.no_grad():
        return diffq.quantize(model, preset, calibration=calibration, progress=False, **options)


def _layer_overrides(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k == "rank"}


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """How many modules of each diffq quantized class the model holds."""
    from diffq.modules import QUANTIZED_MODULES

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QUANTIZED_MODULES):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


@contextmanager
def fallbacks(device: str) -> Iterator[dict[str, int]]:
    """Counts, by reason, the quantized calls that the device's kernels hand to the reference (their
    ``unsupported_reason`` said why); CUDA: the Triton kernels (a 1x1 convolution that falls back
    is counted by both checks), CPU: diffq's CPU kernels."""
    if device == "cuda":
        try:
            from diffq.kernels import triton_ops as module
        except ImportError as exc:  # the dispatch then runs every linear call on the reference
            yield {f"the Triton kernels do not import: {exc}"[:100]: 1}
            return
        names = ["unsupported_reason", "conv2d_unsupported_reason"]
    else:
        from diffq.kernels import cpu as module

        names = ["linear_unsupported_reason", "conv2d_unsupported_reason"]
    counts: dict[str, int] = {}
    originals = {name: getattr(module, name) for name in names}

    def counting(original: Callable[..., str | None]) -> Callable[..., str | None]:
        def reason(*args: Any, **kwargs: Any) -> str | None:
            why = original(*args, **kwargs)
            if why is not None:
                counts[why[:100]] = counts.get(why[:100], 0) + 1
            return why
        return reason

    for name, original in originals.items():
        setattr(module, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


def compile_model(model: nn.Module, how: str, backend: str = "inductor") -> nn.Module:
    """Regional (``compile_repeated_blocks``) or full ``torch.compile``; returns what to call."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if how == "regional" and getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(backend=backend)
        return model
    return torch.compile(model, backend=backend)


# --- timing ---------------------------------------------------------------------------------------


def timed_calls(fn: Callable[[], Any], reps: int, warmup: int, cuda: bool) -> tuple[float, list[float], Any]:
    """First call's seconds, the milliseconds of ``reps`` calls after ``warmup`` more, and the last result."""
    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(reps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1e3)
    return first, times, result


def _peak_reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> int | None:
    return torch.cuda.max_memory_allocated() if cuda else None


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Options:
    """What one run does (parsed from the command line)."""

    models: list[str]
    variants: list[str]
    modes: list[str]
    compile: str = "regional"
    budget: float = 270.0
    reps: int = 5
    warmup: int = 2
    batch: int = 1
    device: str = "cuda"
    tiny: bool = False  # the dry run's tiny-width twins
    backend: str = "inductor"


@dataclass
class Clock:
    """Seconds left of the budget, and the durations measured so far (to decide what still fits)."""

    budget: float
    start: float = field(default_factory=time.perf_counter)
    seen: dict[tuple[str, str], float] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def need(self, what: str, model: str) -> float:
        return self.seen.get((what, model), FIRST_GUESS[what][model])

    def note(self, what: str, model: str, seconds: float) -> None:
        self.seen[(what, model)] = max(seconds, self.seen.get((what, model), 0.0))


def run_unit(key: str, variant: str, opts: Options, clock: Clock) -> list[dict[str, Any]]:
    """Build (and quantize) one model variant, then time its step in each mode; one row per mode."""
    sm = STEP_MODELS[key]
    spec = sm.tiny if opts.tiny else sm.spec
    latent, tokens = (sm.tiny_latent, sm.tiny_text_tokens) if opts.tiny else (sm.latent, sm.text_tokens)
    cuda = opts.device == "cuda"
    preset, options = resolve_variant(variant)
    base = {"model": spec.label, "key": key, "variant": variant, "preset": preset, "options": options,
            "dtype": str(sm.dtype).removeprefix("torch."), "batch": opts.batch, "latent": latent, "text_tokens": tokens}
    prepare = "build" if variant == "fp" else "quantize"
    if clock.left() < clock.need(prepare, key):
        return [{**base, "mode": m, "skipped": f"time cap: {clock.left():.0f} s left of {opts.budget:.0f} s, "
                 f"building {'and quantizing ' if variant != 'fp' else ''}needs about "
                 f"{clock.need(prepare, key):.0f} s"} for m in opts.modes]
    _free(cuda)
    _peak_reset(cuda)
    start = time.perf_counter()
    model = build_model(spec, opts.device, sm.dtype)
    kwargs = inputs_for(model, latent, tokens, opts.batch)
    built = time.perf_counter() - start
    if variant != "fp":  # static scales from one small input: they set scale values, not the kernels' work
        quantize(model, variant, inputs_for(model, min(latent, CALIBRATION[0]), min(tokens, CALIBRATION[1]), 1))
    _free(cuda)
    prepared = time.perf_counter() - start
    base.update(params=sum(p.numel() for p in model.parameters()), build_s=round(built, 2),
                quantize_s=round(prepared - built, 2), weight_bytes=_weight_bytes(model),
                quantized_layers=quantized_layers(model), peak_prepare_bytes=_peak(cuda))
    clock.note(prepare, key, prepared + 5)  # + the eager step's few seconds
    rows = []
    for mode in opts.modes:  # eager first: compiling changes the model in place
        row = {**base, "mode": mode}
        rows.append(row)
        if mode == "compiled" and clock.left() < clock.need("compile", key):
            row["skipped"] = f"time cap: {clock.left():.0f} s left, compiling needs about {clock.need('compile', key):.0f} s"
            continue
        try:
            row.update(time_mode(model, kwargs, mode, opts))
        except Exception as exc:  # the other mode's figures still count
            row.update(error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-2000:])
        if mode == "compiled" and "first_call_s" in row:
            clock.note("compile", key, row["first_call_s"])
    del model, kwargs
    _free(cuda)
    return rows


def time_mode(model: nn.Module, kwargs: Mapping[str, Any], mode: str, opts: Options) -> dict[str, Any]:
    """Time ``model``'s step in one mode: eager (counting calls the kernels hand to the reference) or
    compiled (the first call's time is the compile time)."""
    cuda = opts.device == "cuda"
    found: dict[str, Any] = {}
    call: Callable[..., Any] = model
    if mode == "compiled":
        call = compile_model(model, opts.compile, opts.backend)
        found["compile"] = opts.compile
    _peak_reset(cuda)
    with torch.no_grad():
        if mode == "eager":
            with fallbacks(opts.device) as reasons:  # one step, to see which calls miss the kernels
                call(**kwargs)
            found["reference_calls"] = reasons
        first, times, result = timed_calls(partial(call, **kwargs), opts.reps, opts.warmup, cuda)
    out = result[0]
    return {**found, "ms": statistics.median(times), "ms_all": [round(t, 3) for t in times],
            "first_call_s": round(first, 2), "peak_step_bytes": _peak(cuda),
            "output_finite": bool(torch.isfinite(out).all()), "output_shape": list(out.shape)}


def _weight_bytes(model: nn.Module) -> int:
    from diffq.modules import weight_bytes

    return weight_bytes(model)


def run(opts: Options, after_unit: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every unit in priority order, each failure recorded and the run continued; ``after_unit`` gets
    the rows so far after each unit (to save them, should the run be stopped at its cap)."""
    import torch._dynamo

    clock = Clock(opts.budget)
    rows: list[dict[str, Any]] = []
    for key, variant in order(opts.models, opts.variants):
        try:
            rows += run_unit(key, variant, opts, clock)
        except Exception as exc:  # one variant's failure must not cost the others' figures
            rows += [{"model": STEP_MODELS[key].spec.label, "key": key, "variant": variant, "mode": m,
                      "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-2000:]}
                     for m in opts.modes]
            gc.collect()
            if opts.device == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
        if not opts.tiny:
            print(f"[gpu_step] {key} {variant}: {clock.left():.0f} s left", file=sys.stderr, flush=True)
        if opts.device == "cuda" or "compiled" in opts.modes:
            torch._dynamo.reset()  # the next variant compiles its own blocks; drop this one's
        add_speedups(rows)
        if after_unit is not None:
            after_unit(rows)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``x fp``: the 16-bit model's time in the same mode over this row's."""
    fp = {(r["key"], r["mode"]): r["ms"] for r in rows if r["variant"] == "fp" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["key"], r["mode"]) in fp:
            r["speedup_vs_fp"] = fp[(r["key"], r["mode"])] / r["ms"]


def render(rows: list[dict[str, Any]], opts: Options) -> str:
    """The markdown table of a run."""
    def status(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"error: {r['error'][:160]}"
        if "skipped" in r:
            return f"skipped: {r['skipped']}"
        notes = [] if r.get("output_finite", True) else ["output not finite"]
        if r.get("reference_calls"):
            top = max(r["reference_calls"], key=r["reference_calls"].get)
            notes.append(f"{sum(r['reference_calls'].values())} calls on the reference kernels (e.g. {top})")
        return "; ".join(notes)

    table = markdown(
        ["model", "variant", "preset", "mode", "ms/step", "x fp", "peak step MiB", "peak build+quantize MiB",
         "weights MiB", "quantize s", "first call s", "note"],
        [[r["model"], r["variant"], r.get("preset"), r["mode"], f"{r['ms']:.2f}" if "ms" in r else None,
          f"{r['speedup_vs_fp']:.2f}" if "speedup_vs_fp" in r else None, mib(r.get("peak_step_bytes"), 0),
          mib(r.get("peak_prepare_bytes"), 0), mib(r.get("weight_bytes"), 0), r.get("quantize_s"),
          r.get("first_call_s"), status(r)] for r in rows],
    )
    where = "tiny-width twins on the CPU (dry run)" if opts.tiny else "full size on CUDA"
    return "\n\n".join([
        f"**One denoiser step, {where}** (`python benchmarks/gpu_step.py`): batch {opts.batch}, SDXL UNet fp16 at a "
        "128x128 latent with 77 text tokens, Flux.1 transformer bf16 at 4096 image + 512 text tokens; random "
        f"weights; median of {opts.reps} calls after {opts.warmup} warm-ups; compiled = {opts.compile} "
        "torch.compile; x fp = the 16-bit model's time in the same mode over the row's.",
        table,
        "Variants: w8a8/w4a8 = `w8a8-rtn`/`w4a8-rtn` (static int8 activation scales from one 32x32-latent input), "
        "w4a4 = `w4a4-rtn` with `rank=32`, w4a16 = `w4a16-rtn`; round-to-nearest weights and no smoothing, "
        "the calibrated presets' stored format and kernels.",
    ])


# --- the dry run ----------------------------------------------------------------------------------


def dry_run(opts: Options) -> list[dict[str, Any]]:
    """Rehearse on the CPU: full-size meta builds and forwards, every variant resolved, the GPU code path
    on tiny twins, and the GPU-only APIs present. Returns one line per check."""
    from memory import preset_configs

    checks: list[dict[str, Any]] = []
    for key in opts.models:
        sm = STEP_MODELS[key]
        start = time.perf_counter()
        model = build_model(sm.spec, "meta", sm.dtype)
        kwargs = inputs_for(model, sm.latent, sm.text_tokens, opts.batch)  # on the meta device, like the model
        with torch.no_grad():
            out = model(**kwargs)[0]
        params = sum(p.numel() for p in model.parameters())
        checks.append({"check": f"{key}: full-size meta build + forward", "params": params,
                       "output_shape": list(out.shape), "s": round(time.perf_counter() - start, 2)})
        for variant in opts.variants:
            if variant == "fp":
                continue
            preset, options = resolve_variant(variant)
            configs = preset_configs(model, preset, sm.spec.text_bos)  # the rank override applies at quantize
            checks.append({"check": f"{key}: {variant} = {preset} {options or ''} resolves",
                           "quantized_layers": len(configs)})
        del model
    rows = []
    for key in opts.models:  # compiled: the 16-bit model and the first quantized variant (the same code path)
        units = [v for m, v in order([key], opts.variants)]
        first = [v for v in units if v == "fp"] + [v for v in units if v != "fp"][:1]
        for variants, modes in ((first, opts.modes), ([v for v in units if v not in first], ["eager"])):
            if variants and (set(modes) & set(opts.modes)):
                tiny = Options(**{**opts.__dict__, "models": [key], "variants": variants, "device": "cpu",
                                  "tiny": True, "reps": 1, "warmup": 0, "backend": "eager", "budget": 1e9,
                                  "modes": [m for m in modes if m in opts.modes]})
                rows += run(tiny)
    for r in rows:
        if "error" in r:
            raise RuntimeError(f"dry run: {r['key']} {r['variant']} {r['mode']} failed: {r['error']}\n{r['traceback']}")
    checks += [{"check": f"{r['key']}: {r['variant']} {r['mode']} on the tiny twin", "ms": round(r["ms"], 1),
                "quantized_layers": r.get("quantized_layers"), "reference_calls": r.get("reference_calls")}
               for r in rows]
    checks.append({"check": "GPU APIs present", "apis": gpu_apis()})
    return checks


def gpu_apis() -> list[str]:
    """The CUDA-only calls the run makes, looked up (not called): a missing one raises."""
    names = ["cuda.Event", "cuda.max_memory_allocated", "cuda.reset_peak_memory_stats", "cuda.synchronize",
             "cuda.empty_cache", "compile"]
    for name in names:
        obj: Any = torch
        for part in name.split("."):
            obj = getattr(obj, part)
    return names


# --- command line ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[Options, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux,sdxl", help=f"comma-separated, from {', '.join(STEP_MODELS)}")
    parser.add_argument("--variants", default="fp,w8a8,w4a8,w4a4,w4a16",
                        help=f"comma-separated: fp, {', '.join(VARIANTS)} or any diffq preset name")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    parser.add_argument("--compile", choices=("regional", "full"), default="regional",
                        help="regional: diffusers' compile_repeated_blocks; full: torch.compile(model)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds; what does not fit is skipped")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "gpu_step", help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU; launches nothing heavy")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in models if m not in STEP_MODELS] + [m for m in modes if m not in ("eager", "compiled")]
    modes = [m for m in ("eager", "compiled") if m in modes]  # eager first: compiling changes the model
    if bad:
        parser.error(f"unknown model or mode {bad}")
    for v in variants:
        try:
            resolve_variant(v)
        except Exception as exc:
            parser.error(str(exc))
    opts = Options(models, variants, modes, compile=args.compile, budget=args.budget, reps=args.reps, batch=args.batch)
    return opts, args.out, args.dry_run


def main(argv: list[str] | None = None) -> int:
    opts, out, dry = parse(argv)
    if dry:
        start = time.perf_counter()
        checks = dry_run(opts)
        for c in checks:
            print("[dry-run] " + ", ".join(f"{k}={v}" for k, v in c.items()))
        print(f"[dry-run] gpu_step: {len(checks)} checks passed in {time.perf_counter() - start:.1f} s")
        return 0
    if not torch.cuda.is_available():
        print("gpu_step.py needs CUDA (use --dry-run to rehearse on the CPU).", file=sys.stderr)
        return 2
    info = machine()

    def save(rows: list[dict[str, Any]]) -> list[Path]:
        text = f"{render(rows, opts)}\n\n{machine_line(info)}"
        return write_results(out, text, {"machine": info, "options": opts.__dict__, "rows": rows})

    rows = run(opts, after_unit=save)
    paths = save(rows)
    print(f"{render(rows, opts)}\n\n{machine_line(info)}")
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
