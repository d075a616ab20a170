"""diffq's Gradio demo: a full-precision and a quantized image from the same seed, side by side.

Run it with ``diffq demo`` or ``python app.py [--host H] [--port P] [--share] [--model M] [--threads N]``.

The page is a thin layer over :class:`DemoModels`, plain Python that loads and caches pipelines,
generates both images, measures bytes, seconds, PSNR and SSIM, and draws the plan and the
calibration ranges. Tests drive it without a browser. ``$DIFFQ_DEMO_MODEL`` pre-fills the model.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings or version checks

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffq  # noqa: E402
from diffq.metrics.fidelity import psnr, ssim  # noqa: E402
from diffq.pipelines import adapter_for, denoiser_of  # noqa: E402
from diffq.pipelines.call_defaults import call_defaults, recorded_source  # noqa: E402
from diffq.pipelines.serialization import plan_of  # noqa: E402

log = logging.getLogger("diffq.demo")

BUNDLED_MODELS = ("digits-sd", "digits-dit")
MODEL_ENV = "DIFFQ_DEMO_MODEL"
DEFAULT_MODEL = "digits-sd"
DEFAULT_PRESET = "w4a8"
DEFAULT_PROMPT = "a handwritten digit 7"
DEFAULT_STEPS = 20
MAX_STEPS = 100
MAX_SEED = 2**63 - 1
CALIBRATION_STEPS = 8
TEMPORAL_CHOICES = (("kept in 16-bit", "16"), ("8-bit weights", "8"), ("4-bit weights", "4"))
"""The temporal-layers picker: (label, value); see ``temporal_bits`` of :func:`diffq.quantize`."""
DISPLAY_SIZE = 256
"""Images smaller than this many pixels are enlarged (nearest neighbour) for display only."""
IMAGE_BUTTONS = ["download", "fullscreen"]  # no "share" button: it uploads to the Hugging Face Hub

Report = Callable[[float, str], None]
"""A progress callback: ``report(fraction_done, description)``."""


class DemoInputError(diffq.DiffQError):
    """A request the demo cannot serve; its message is shown on the page as it is."""


def _quiet(_fraction: float, _desc: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Requests, call arguments, metrics
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One validated generation request."""

    model: str
    preset: str
    prompt: str
    seed: int
    steps: int
    temporal_bits: int | None = None  # the temporal modulation layers: None keeps them in 16-bit


def _whole_number(value: Any, what: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoInputError(f"The {what} is empty; enter a whole number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"The {what} {value!r} is not a number; enter a whole number.") from None
    if not math.isfinite(number) or number != int(number):
        raise DemoInputError(f"The {what} {value!r} is not a whole number.")
    return int(number)


def validate_choice(model: Any, preset: Any) -> tuple[str, str]:
    """``(model, preset)`` stripped; raise :class:`DemoInputError` if either is empty or the preset is unknown."""
    model = str(model or "").strip()
    if not model:
        raise DemoInputError(
            f"Choose a model: a bundled one ({', '.join(BUNDLED_MODELS)}), a Hugging Face Hub id or a local folder."
        )
    preset = str(preset or "").strip()
    presets = diffq.available_presets()
    if preset not in presets:
        raise DemoInputError(f"Unknown preset {preset!r}; choose one of {', '.join(presets)}.")
    return model, preset


def validate_temporal(value: Any) -> int | None:
    """The temporal-layers picker's value as ``temporal_bits``: ``None`` (16-bit, also for empty), 8 or 4."""
    text = str(value if value is not None else "").strip().removesuffix("-bit")
    if text in ("", "16"):
        return None
    if text in ("8", "4"):
        return int(text)
    raise DemoInputError(f"Temporal layers {value!r}: choose 16 (kept), 8 or 4 bits.")


def validate_request(model: Any, preset: Any, prompt: Any, seed: Any, steps: Any, temporal: Any = None) -> Request:
    """Check the page's inputs; raise :class:`DemoInputError` with a message that says what to change."""
    model, preset = validate_choice(model, preset)
    temporal_bits = validate_temporal(temporal)
    prompt = str(prompt or "").strip()
    if not prompt:
        raise DemoInputError("The prompt is empty: say what to draw, e.g. 'a handwritten digit 7'.")
    seed_value = _whole_number(seed, "seed")
    if not 0 <= seed_value <= MAX_SEED:
        raise DemoInputError(f"The seed must be between 0 and {MAX_SEED}, got {seed_value}.")
    steps_value = _whole_number(steps, "number of steps")
    if not 1 <= steps_value <= MAX_STEPS:
        raise DemoInputError(f"The number of steps must be between 1 and {MAX_STEPS}, got {steps_value}.")
    return Request(model, preset, prompt, seed_value, steps_value, temporal_bits)


def source_model(model: str) -> str | None:
    """The model a local diffq-quantized folder was made from (its ``diffq_report.json``), if recorded."""
    return recorded_source(model)


def default_call_kwargs(model: str) -> dict[str, Any]:
    """Pipeline call defaults for ``model``: a bundled model's (also for a folder quantized from one), else none."""
    return call_defaults(model)


def default_steps(model: str) -> int | None:
    """The number of denoising steps ``model`` is meant to run with, if it is a bundled model (or made from one)."""
    steps = default_call_kwargs(model).get("num_inference_steps")
    return None if steps is None else min(int(steps), MAX_STEPS)


def accepted_kwargs(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``pipe.__call__`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None].clamp(0, 1)


def fidelity(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(PSNR dB, SSIM)`` of an ``[H, W, C]`` image in [0, 1] against the reference image."""
    a, b = _as_batch(image), _as_batch(reference)
    return psnr(a, b), ssim(a, b)


def format_bytes(count: int) -> str:
    """``1536`` → ``'1.50 KiB'``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def for_display(image: np.ndarray, size: int = DISPLAY_SIZE) -> Image.Image:
    """An ``[H, W, C]`` float image as a PIL image, enlarged by a whole factor if it is small."""
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8).squeeze())
    factor = size // max(pil.size)
    if factor > 1:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    return pil


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Both images of one request and what they cost."""

    request: Request
    preset: str  # the preset of the quantized image (a quantized folder keeps its own)
    quantized: np.ndarray  # [H, W, C] in [0, 1]
    quantized_seconds: float
    quantized_bytes: int
    full: np.ndarray | None = None  # None for a quantized folder without a loadable float source
    full_seconds: float | None = None
    full_bytes: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    notes: list[str] = field(default_factory=list)

    def metrics_markdown(self) -> str:
        """A Markdown table: weight bytes, seconds per image, PSNR/SSIM."""
        dash = "—"
        ratio = ""
        if self.full_bytes:
            ratio = f" ({self.full_bytes / max(self.quantized_bytes, 1):.2f}× smaller)"
        fidelity_text = dash if self.psnr is None else f"{self.psnr:.2f} dB / {self.ssim:.4f}"
        rows = [
            ("", "full precision", f"quantized ({self.preset})"),
            ("---", "---", "---"),
            ("denoiser weights", format_bytes(self.full_bytes) if self.full_bytes else dash,
             format_bytes(self.quantized_bytes) + ratio),
            ("seconds per image", dash if self.full_seconds is None else f"{self.full_seconds:.2f} s",
             f"{self.quantized_seconds:.2f} s"),
            ("PSNR / SSIM vs full precision", dash, fidelity_text),
        ]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)


@dataclass
class PlanView:
    """What the plan tab shows."""

    preset: str
    table: str
    bits_chart: Path
    ranges_chart: Path | None
    quantized_layers: int
    kept_layers: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Loading, caching, generating
# ---------------------------------------------------------------------------------------------------------------


class DemoModels:
    """Loads and caches the demo's pipelines; every public method is safe to call from several threads.

    Float pipelines are cached per model and quantized ones per ``(model, preset, temporal bits)`` (least recently
    used ones are dropped beyond ``max_float`` / ``max_quantized``); calibration statistics are cached
    per model. ``call_kwargs`` are added to every pipeline call (e.g. ``height``/``width``), on top
    of a bundled model's defaults.
    """

    def __init__(
        self,
        *,
        call_kwargs: dict[str, Any] | None = None,
        calibration_prompts: list[str] | None = None,
        calibration_steps: int = CALIBRATION_STEPS,
        max_float: int = 2,
        max_quantized: int = 4,
        device: str | None = None,
        work_dir: str | os.PathLike | None = None,
        progress_bars: bool = True,
    ) -> None:
        self.call_kwargs = dict(call_kwargs or {})
        self.calibration_prompts = calibration_prompts
        self.calibration_steps = calibration_steps
        self.max_float = max_float
        self.max_quantized = max_quantized
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="diffq-demo-")  # removed at exit
        self.work_dir = Path(work_dir) if work_dir else Path(self._tmp.name)
        self.progress_bars = progress_bars
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # model → pipeline as loaded (float or quantized)
        self._quantized: OrderedDict[tuple[str, str, int | None], Any] = OrderedDict()
        self._stats: OrderedDict[str, diffq.CalibrationStats] = OrderedDict()
        self._lock = threading.RLock()

    # -- caches -----------------------------------------------------------------------------------------------

    @staticmethod
    def _remember(cache: OrderedDict, key: Any, value: Any, limit: int) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > max(limit, 1):
            cache.popitem(last=False)

    def _load(self, model: str) -> Any:
        pipe = diffq.load(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def loaded(self, model: str, report: Report = _quiet) -> Any:
        """``model`` as it is on disk (float or diffq-quantized), cached."""
        with self._lock:
            if model in self._loaded:
                self._loaded.move_to_end(model)
                return self._loaded[model]
            report(0.0, f"loading {model}")
            pipe = self._load(model)
            self._remember(self._loaded, model, pipe, self.max_float)
            return pipe

    @staticmethod
    def is_quantized(pipe: Any) -> bool:
        return plan_of(denoiser_of(pipe)) is not None

    def full_precision(self, model: str, report: Report = _quiet) -> tuple[Any | None, str | None]:
        """``(float pipeline, note)``; a quantized folder's float source when its report names one."""
        pipe = self.loaded(model, report)
        if not self.is_quantized(pipe):
            return pipe, None
        source = source_model(model)
        if source is None:
            return None, (f"{model} is already quantized and does not say which float model it came from "
                          "(no diffq_report.json), so there is no full-precision image to compare with.")
        try:
            reference = self.loaded(source, report)
        except diffq.DiffQError as err:
            return None, f"the float model {source!r} this folder was quantized from could not be loaded: {err}"
        if self.is_quantized(reference):
            return None, f"the source model {source!r} is itself quantized; no full-precision image to compare with."
        return reference, f"full precision is {source!r}, the model this folder was quantized from."

    def calibration(self, model: str, report: Report = _quiet) -> diffq.CalibrationStats:
        """Calibration statistics of float ``model`` (cached): per-layer, per-step activation ranges."""
        with self._lock:
            if model in self._stats:
                self._stats.move_to_end(model)
                return self._stats[model]
            pipe, note = self.full_precision(model, report)
            if pipe is None:
                raise DemoInputError(f"Cannot calibrate: {note}")
            from diffq.pipelines.calibrate import default_prompts

            prompts = list(self.calibration_prompts or default_prompts(pipe))
            kwargs = {k: v for k, v in self._call_kwargs(model, pipe).items() if k != "num_inference_steps"}
            total = len(prompts) * self.calibration_steps
            with _count_calls(denoiser_of(pipe), lambda n: report(
                    0.05 + 0.35 * min(n, total) / total, f"calibrating {model}: step {min(n, total)}/{total}")):
                stats = diffq.calibrate(pipe, prompts, num_inference_steps=self.calibration_steps,
                                        progress=self.progress_bars, **kwargs)
            self._remember(self._stats, model, stats, self.max_float)
            return stats

    def quantized(self, model: str, preset: str, report: Report = _quiet,
                  temporal_bits: int | None = None) -> tuple[Any, str, bool]:
        """``(quantized pipeline, its preset, came from cache)``; a quantized folder is used as it is.
        ``temporal_bits`` (8 or 4) quantizes the temporal modulation layers weight-only too."""
        with self._lock:
            pipe = self.loaded(model, report)
            if self.is_quantized(pipe):
                return pipe, plan_of(denoiser_of(pipe)).preset, True
            key = (model, preset, temporal_bits)
            if key in self._quantized:
                self._quantized.move_to_end(key)
                return self._quantized[key], preset, True
            recipe = diffq.get_preset(preset)
            stats = self.calibration(model, report) if recipe.needs_calibration() else None
            report(0.4, f"quantizing {model} to {preset}")
            fresh = self._load(model)  # quantize() works in place: never on the cached float pipeline
            kwargs = {k: v for k, v in self._call_kwargs(model, fresh).items() if k != "num_inference_steps"}
            diffq.quantize(fresh, preset, calibration=stats, num_calibration_steps=self.calibration_steps,
                           temporal_bits=temporal_bits, progress=self.progress_bars, **kwargs)
            self._remember(self._quantized, key, fresh, self.max_quantized)
            return fresh, preset, False

    # -- generation -------------------------------------------------------------------------------------------

    def _call_kwargs(self, model: str, pipe: Any) -> dict[str, Any]:
        return accepted_kwargs(pipe, {**default_call_kwargs(model), **self.call_kwargs})

    def _run(self, pipe: Any, model: str, request: Request, report: Report, start: float, span: float,
             label: str) -> tuple[np.ndarray, float]:
        kwargs = self._call_kwargs(model, pipe)
        kwargs["num_inference_steps"] = request.steps
        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def on_step_end(_pipe: Any, step: int, _t: Any, tensors: dict) -> dict:
                report(start + span * (step + 1) / request.steps, f"{label}: step {step + 1}/{request.steps}")
                return tensors

            kwargs["callback_on_step_end"] = on_step_end
        report(start, f"{label}: generating")
        generator = torch.Generator().manual_seed(request.seed)
        begin = time.perf_counter()
        with torch.inference_mode():
            output = pipe(request.prompt, generator=generator, output_type="np", **kwargs)
        seconds = time.perf_counter() - begin
        return np.asarray(output.images[0], dtype=np.float32), seconds

    def generate(self, request: Request, report: Report = _quiet) -> Comparison:
        """Full-precision and quantized images of ``request`` from the same seed, with their metrics."""
        with self._lock:
            began = time.perf_counter()
            full_pipe, note = self.full_precision(request.model, report)
            q_pipe, preset, cached = self.quantized(request.model, request.preset, report, request.temporal_bits)
            notes = [note] if note else []
            if preset != request.preset:
                notes.append(f"{request.model} is already quantized with {preset}; the preset and temporal-layer "
                             "pickers do not apply.")
            notes.append("quantized pipeline from the cache" if cached
                         else f"quantized pipeline built in {time.perf_counter() - began:.1f} s and cached")
            full = full_seconds = full_bytes = None
            if full_pipe is not None:
                full, full_seconds = self._run(full_pipe, request.model, request, report, 0.5, 0.25, "full precision")
                full_bytes = diffq.weight_bytes(full_pipe)
            start = 0.75 if full_pipe is not None else 0.5
            quant, quant_seconds = self._run(q_pipe, request.model, request, report, start, 1.0 - start, "quantized")
            result = Comparison(request, preset, quant, quant_seconds, diffq.weight_bytes(q_pipe), full=full,
                                full_seconds=full_seconds, full_bytes=full_bytes, notes=notes)
            if full is not None:
                result.psnr, result.ssim = fidelity(quant, full)
            report(1.0, "done")
            return result

    # -- plan -------------------------------------------------------------------------------------------------

    def plan(self, model: str, preset: str, report: Report = _quiet, temporal_bits: int | None = None) -> PlanView:
        """The plan of ``model`` quantized with ``preset``: table, bits chart and calibration ranges."""
        with self._lock:
            pipe, actual, _cached = self.quantized(model, preset, report, temporal_bits)
            denoiser = denoiser_of(pipe)
            plan = plan_of(denoiser)
            notes: list[str] = []
            out = self.work_dir / _slug(f"{model}-{actual}")
            try:
                groups = {name: adapter_for(denoiser).group_of(name) for name in plan.layers}
            except diffq.DiffQError:
                groups = None
            report(0.7, "drawing the plan")
            from diffq.plots import plot_activation_ranges, plot_bits

            bits_chart = plot_bits(plan, out, groups)
            ranges_chart = None
            try:
                stats = self.calibration(model, report)
            except DemoInputError as err:
                notes.append(str(err))
            else:
                report(0.9, "drawing the activation ranges")
                ranges_chart = plot_activation_ranges(stats, out, top=6)
            report(1.0, "done")
            return PlanView(actual, plan.table(), bits_chart, ranges_chart, len(plan.layers), len(plan.skipped), notes)


@contextlib.contextmanager
def _count_calls(module: torch.nn.Module, on_call: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_call(n)`` before the n-th forward of ``module`` inside the block (progress of long runs)."""
    count = 0

    def hook(_module: torch.nn.Module, _args: tuple) -> None:
        nonlocal count
        count += 1
        on_call(count)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-120:] or "model"


# ---------------------------------------------------------------------------------------------------------------
# The Gradio page
# ---------------------------------------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """``text`` shown literally by Markdown (paths keep their underscores, messages their ``<...>``)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text)


def error_markdown(err: BaseException) -> str:
    """The status line for an error: its message, never a traceback."""
    if isinstance(err, diffq.DiffQError):
        return f"**Error:** {escape_markdown(str(err))}"
    return (f"**Error:** something went wrong ({escape_markdown(f'{type(err).__name__}: {err}')}). "
            "The server log has the details.")


def success_markdown(result: Comparison, seconds: float) -> str:
    """The status line after a generation: what ran, and notes (cache, source model)."""
    r = result.request
    temporal = f", temporal layers {r.temporal_bits}-bit" if r.temporal_bits and result.preset == r.preset else ""
    lines = [f"**Done** in {seconds:.1f} s — seed {r.seed}, {r.steps} steps, preset {escape_markdown(result.preset)}"
             f"{temporal}."]
    lines += [f"- {escape_markdown(note)}" for note in result.notes]
    return "\n".join(lines)


def handle_generate(models: DemoModels, model: Any, preset: Any, prompt: Any, seed: Any, steps: Any,
                    report: Report = _quiet, *, temporal: Any = None
                    ) -> tuple[Image.Image | None, Image.Image | None, str, str]:
    """The Generate button: ``(full-precision image, quantized image, metrics, status)``; errors become a status."""
    began = time.perf_counter()
    try:
        result = models.generate(validate_request(model, preset, prompt, seed, steps, temporal), report)
    except Exception as err:  # the page shows a message and keeps serving
        if not isinstance(err, diffq.DiffQError):
            log.exception("generation failed")
        return None, None, "", error_markdown(err)
    full = for_display(result.full) if result.full is not None else None
    return (full, for_display(result.quantized), result.metrics_markdown(),
            success_markdown(result, time.perf_counter() - began))


def handle_plan(models: DemoModels, model: Any, preset: Any, report: Report = _quiet, *,
                temporal: Any = None) -> tuple[Image.Image | None, Image.Image | None, str, str]:
    """The plan tab's button: ``(bits chart, activation-ranges chart, plan table, status)``."""
    try:
        view = models.plan(*validate_choice(model, preset), report, validate_temporal(temporal))
    except Exception as err:
        if not isinstance(err, diffq.DiffQError):
            log.exception("plan failed")
        return None, None, "", error_markdown(err)
    status = (f"**{escape_markdown(view.preset)}**: {view.quantized_layers} layers quantized, "
              f"{view.kept_layers} kept in 16-bit." + "".join(f"\n- {escape_markdown(n)}" for n in view.notes))
    with Image.open(view.bits_chart) as bits:
        bits_image = bits.convert("RGB")
    ranges_image = None
    if view.ranges_chart is not None:
        with Image.open(view.ranges_chart) as ranges:
            ranges_image = ranges.convert("RGB")
    return bits_image, ranges_image, view.table, status


def build_app(model: str | None = None, models: DemoModels | None = None):
    """The demo page (a ``gr.Blocks``); ``model`` pre-fills the model field (default ``$DIFFQ_DEMO_MODEL``)."""
    import gradio as gr

    models = models or DemoModels()
    initial_model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    presets = diffq.available_presets()

    def reporter(progress: gr.Progress) -> Report:
        return lambda fraction, desc: progress(min(max(fraction, 0.0), 1.0), desc=desc)

    def on_generate(model_, preset_, prompt_, seed_, steps_, temporal_, progress=gr.Progress()):  # noqa: B008
        return handle_generate(models, model_, preset_, prompt_, seed_, steps_, reporter(progress), temporal=temporal_)

    def on_plan(model_, preset_, temporal_, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        return handle_plan(models, model_, preset_, reporter(progress), temporal=temporal_)

    def on_model_change(model_):
        steps = default_steps(str(model_ or "").strip())
        return gr.update() if steps is None else gr.update(value=steps)

    with gr.Blocks(title="diffq demo") as demo:
        gr.Markdown("# diffq — full precision vs quantized\nOne seed, two pipelines: the float model and "
                    "the same model quantized by diffq.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model_box = gr.Dropdown(list(BUNDLED_MODELS), value=initial_model, allow_custom_value=True,
                                        label="model", elem_id="model",
                                        info="bundled, a Hugging Face Hub id or a local folder (float or quantized)")
                preset_box = gr.Dropdown(presets, value=DEFAULT_PRESET if DEFAULT_PRESET in presets else presets[0],
                                         label="preset", elem_id="preset")
                temporal_box = gr.Dropdown(list(TEMPORAL_CHOICES), value="16", label="temporal layers",
                                           elem_id="temporal",
                                           info="AdaLN / time-embedding projections: 16-bit, or weight-only 8 or 4 bits")
                prompt_box = gr.Textbox(DEFAULT_PROMPT, label="prompt", elem_id="prompt", max_lines=3)
                with gr.Row():
                    seed_box = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    steps_box = gr.Slider(1, MAX_STEPS, value=default_steps(initial_model) or DEFAULT_STEPS, step=1,
                                          label="steps", elem_id="steps")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Compare", id="compare"):
                        status = gr.Markdown("Pick a model and a preset, then **Generate**.", elem_id="status")
                        with gr.Row():
                            full_image = gr.Image(label="full precision", type="pil", interactive=False,
                                                  buttons=IMAGE_BUTTONS, height=DISPLAY_SIZE + 40,
                                                  elem_id="full-image")
                            quant_image = gr.Image(label="quantized", type="pil", interactive=False,
                                                   buttons=IMAGE_BUTTONS, height=DISPLAY_SIZE + 40,
                                                   elem_id="quantized-image")
                        metrics = gr.Markdown(elem_id="metrics")
                    with gr.Tab("Plan & calibration", id="plan"):
                        plan_button = gr.Button("Show plan and calibration ranges", elem_id="show-plan")
                        plan_status = gr.Markdown(elem_id="plan-status")
                        bits_chart = gr.Image(label="weight bits per layer", type="pil", interactive=False,
                                              buttons=IMAGE_BUTTONS, elem_id="bits-chart")
                        ranges_chart = gr.Image(label="activation ranges per denoising step (calibration)",
                                                type="pil", interactive=False, buttons=IMAGE_BUTTONS,
                                                elem_id="ranges-chart")
                        plan_table = gr.Code(label="plan", language=None, lines=10, max_lines=24,
                                             elem_id="plan-table")

        inputs = [model_box, preset_box, prompt_box, seed_box, steps_box, temporal_box]
        # The HTTP API (gradio_api/call/generate, .../plan) takes the same inputs as the page.
        generate_button.click(on_generate, inputs, [full_image, quant_image, metrics, status], api_name="generate")
        prompt_box.submit(on_generate, inputs, [full_image, quant_image, metrics, status], api_name=False)
        plan_button.click(on_plan, [model_box, preset_box, temporal_box], [bits_chart, ranges_chart, plan_table, plan_status],
                          api_name="plan")
        model_box.change(on_model_change, [model_box], [steps_box])
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **kwargs: Any):
    """Start the server (no SSR node server, no MCP server); returns ``demo.launch``'s result."""
    return demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, mcp_server=False,
                       **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python app.py [--host H] [--port P] [--share] [--model M] [--threads N]``."""
    parser = argparse.ArgumentParser(description="diffq demo: full precision vs quantized, side by side")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--model", default=None, help=f"pre-filled model (default ${MODEL_ENV} or {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 helps on a busy shared machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO)
    launch(build_app(args.model), args.host, args.port, args.share)


if __name__ == "__main__":
    main()
