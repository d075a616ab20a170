"""The ``diffq`` command line: quantize, generate, eval, and the demo."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from diffq.saving import check_file_target, json_has_keys, png_info, png_is_ours, write_file

DEFAULT_MODEL = "digits-sd"
NO_CHECK_HELP = (
    "mixed precision: keep the integer program's plan without checking it end to end against the "
    "uniform plan within the budget"
)
METRIC_HELP = (
    "mixed precision: score each layer by MixDQ's two metrics (decoupled: SSIM for content layers, SQNR "
    "for quality layers) or by the final images' PSNR (image)"
)
OVERWRITE_FILE_HELP = (
    "replace existing files at the output paths that diffq did not write (an earlier file of the same kind "
    "diffq wrote is replaced anyway)"
)
TEMPORAL_BITS_HELP = (
    "quantize the temporal modulation layers (AdaLN, time projections) weight-only too; by default they stay 16-bit"
)


def _whole(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _finite(minimum: float | None = None):
    """An argparse type: a finite number (of at least ``minimum``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number" + (f" >= {minimum:g}" if minimum is not None else ""))
        return value

    parse.__name__ = "finite number"
    return parse


POSITIVE, NON_NEGATIVE = _whole(1), _whole(0)


def _call_kwargs(model: str, args: argparse.Namespace) -> dict:
    """Pipeline-call defaults of a bundled model, overridden by the flags that were given."""
    from diffq.pipelines.call_defaults import call_defaults

    kwargs = call_defaults(model)
    for flag, key in (("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                      ("height", "height"), ("width", "width")):
        value = getattr(args, flag, None)
        if value is not None:
            kwargs[key] = value
    return kwargs


def _single_file_flags(args: argparse.Namespace) -> dict:
    """``--pipeline-class`` / ``--config`` / ``--allow-pickle`` as loading kwargs (single-file checkpoints)."""
    from diffq.pipelines.single_file import pipeline_class_named

    kwargs: dict = {"config": args.config} if args.config else {}
    if args.pipeline_class:
        kwargs["pipeline_class"] = pipeline_class_named(args.pipeline_class)
    if args.allow_pickle:
        kwargs["allow_pickle"] = True
    return kwargs


LOW_MEMORY = {"auto": "auto", "on": True, "off": False}
DTYPES = ("float32", "float16", "bfloat16")


def _dtype_flags(args: argparse.Namespace) -> dict:
    """``--dtype`` as loading kwargs (nothing when not given: diffusers' default, float32)."""
    import torch

    from diffq.pipelines.loading import dtype_kwargs

    return dtype_kwargs(getattr(torch, args.dtype)) if args.dtype else {}


def cmd_quantize(args: argparse.Namespace) -> int:
    import diffq
    from diffq.pipelines.calibrate import default_prompts
    from diffq.pipelines.model_card import card_file_name, layer_parameter_counts, model_card
    from diffq.pipelines.serialization import check_save_target, save_quantized

    start = time.perf_counter()
    pipe = diffq.load(args.model, **_single_file_flags(args), **_dtype_flags(args))
    out = Path(args.out)
    check_save_target(pipe, out, overwrite=args.overwrite)  # before minutes of calibration, not after
    fp_bytes = diffq.weight_bytes(pipe)
    layer_params = layer_parameter_counts(diffq.pipelines.denoiser_of(pipe))
    prompts = _read_prompts(args.prompts)
    recipe = diffq.get_preset(args.preset)
    rounding = {"w_round": args.weight_rounding} if args.weight_rounding else {}
    calibration_prompts = len(prompts or default_prompts(pipe)) if recipe.needs_calibration(**rounding) else None
    diffq.quantize(pipe, args.preset, calibration=prompts, num_calibration_steps=args.calibration_steps,
                   weight_rounding=args.weight_rounding, temporal_bits=args.temporal_bits,
                   sensitivity_metric=args.sensitivity_metric, include=args.include, exclude=args.exclude,
                   check=not args.no_check, progress=not args.no_progress, low_memory=LOW_MEMORY[args.low_memory])
    seconds = time.perf_counter() - start
    plan = diffq.pipelines.serialization.plan_of(diffq.pipelines.denoiser_of(pipe))
    report = {
        "model": args.model,
        "preset": args.preset,
        "denoiser": type(diffq.pipelines.denoiser_of(pipe)).__name__,
        "quantized_layers": len(plan.layers),
        "kept_layers": plan.skipped,
        "selection": plan.selection or None,
        "weight_rounding": args.weight_rounding,
        "temporal_bits": args.temporal_bits,
        "sensitivity_metric": args.sensitivity_metric if recipe.is_mixed else None,
        "calibration_prompts": calibration_prompts,
        "calibration_steps": args.calibration_steps if calibration_prompts else None,
        "weight_bytes_fp": fp_bytes,
        "weight_bytes": diffq.weight_bytes(pipe),
        "compression": round(fp_bytes / max(diffq.weight_bytes(pipe), 1), 3),
        "seconds": round(seconds, 2),
    }
    files = {"diffq_report.json": json.dumps(report, indent=2) + "\n"}
    card = card_file_name(out.expanduser().resolve())
    if card != "README.md":  # a README.md of the user's (or one they edited) is carried over as it is
        files["README.md"] = (out / "README.md").read_bytes()
    files[card] = model_card(report, plan, layer_params, str(out))
    save_quantized(pipe, out, overwrite=args.overwrite, extra_files=files)  # report and card inside the swap
    print(f"quantized {args.model} with {args.preset}: {report['quantized_layers']} layers, "
          f"denoiser {fp_bytes / 2**20:.2f} MiB -> {report['weight_bytes'] / 2**20:.2f} MiB "
          f"({report['compression']}x) in {seconds:.1f}s; saved to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import diffq

    if not args.prompt.strip():
        raise diffq.QuantizationInputError("--prompt is empty; say what to draw, e.g. --prompt 'a handwritten digit 7'.")
    out = Path(args.out)
    image_format = _image_format(out)
    check_file_target(out, overwrite=args.overwrite, replaceable=png_is_ours)  # before the model is loaded
    pipe = diffq.load(args.model)
    if args.preset:
        diffq.quantize(pipe, args.preset, progress=not args.no_progress)
    pipe.set_progress_bar_config(disable=args.no_progress)
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(args.prompt, generator=generator, **_call_kwargs(args.model, args)).images[0]
    options = {"pnginfo": png_info()} if image_format == "PNG" else {}
    write_file(out, lambda temporary: image.save(temporary, format=image_format, **options),
               overwrite=args.overwrite, replaceable=png_is_ours)
    print(f"wrote {out}")
    return 0


def _image_format(path: Path) -> str:
    """The PIL format an image path's suffix names (PNG when it has none)."""
    from PIL import Image

    if not path.suffix:
        return "PNG"
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        from diffq.errors import QuantizationInputError

        raise QuantizationInputError(f"--out {path}: {path.suffix!r} is not an image format PIL writes; use .png or .jpg.")
    return image_format


def cmd_eval(args: argparse.Namespace) -> int:
    from diffq.metrics import evaluate

    return evaluate.run(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import diffq
    from diffq.plots import plot_activation_ranges, widest_drift

    if not args.plot and not args.out:
        raise diffq.QuantizationInputError("say what to write: --plot DIR and/or --out STATS.safetensors.")
    if args.out:  # refused before calibrating, not after
        from diffq.calibration import is_stats_file

        check_file_target(Path(args.out), overwrite=args.overwrite, replaceable=is_stats_file)
        check_file_target(Path(f"{args.out}.json"), overwrite=args.overwrite,
                          replaceable=json_has_keys("version", "layers"))
    if args.plot:
        check_file_target(Path(args.plot) / "activation_ranges.png", overwrite=args.overwrite, replaceable=png_is_ours)
    pipe = diffq.load(args.model)
    prompts = _read_prompts(args.prompts)
    call = {k: v for k, v in _call_kwargs(args.model, args).items() if k != "num_inference_steps"}
    stats = diffq.calibrate(pipe, prompts, num_inference_steps=args.steps, progress=not args.no_progress, **call)
    if args.out:
        stats.save(args.out, overwrite=args.overwrite)
        print(f"wrote {args.out} and {args.out}.json")
    if args.plot:
        figure = plot_activation_ranges(stats, args.plot, top=args.top, overwrite=args.overwrite)
        print(f"wrote {figure}")
        for name in widest_drift(stats, args.top):
            print(f"  drift x{stats.drift(name):6.2f}  {name}")
    return 0


def _read_prompts(path: str | None) -> list[str] | None:
    from diffq.errors import QuantizationInputError

    if not path:
        return None
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise QuantizationInputError(f"cannot read the prompts file {path} ({err}); give a text file with one "
                                     "prompt per line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QuantizationInputError(f"{path} holds no prompts; write one prompt per line.")
    return prompts


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Measure sensitivities; under ``accelerate launch`` each process takes every n-th layer."""
    import diffq
    from diffq.distributed import end_processes, gather_objects, process_state
    from diffq.sensitivity import Candidate, is_sensitivity_file

    state = process_state(force_cpu=args.cpu)
    index, count, is_main = state.process_index, state.num_processes, state.is_main_process
    pipe = diffq.load(args.model)
    call = {k: v for k, v in _call_kwargs(args.model, args).items() if k != "num_inference_steps"}
    candidates = [Candidate.parse(c) for c in args.candidates.split(",")] if args.candidates else None
    prompts = _read_prompts(args.prompts)
    out = Path(args.out)
    part = out.with_name(f"{out.name}.part{index}-of-{count}") if count > 1 else out
    check_file_target(out, overwrite=args.overwrite, replaceable=is_sensitivity_file)
    result = diffq.sensitivity(
        pipe, None, candidates, prompts, num_inference_steps=args.steps, cache=part, shard=(index, count),
        metric=args.metric, include=args.include, exclude=args.exclude, progress=not args.no_progress and is_main,
        overwrite=args.overwrite, **call,
    )
    if count > 1:
        parts = gather_objects([result], state)
        if is_main:
            merged = parts[0]
            for other in parts[1:]:
                merged = merged.merge(other)
            merged.save(out, overwrite=args.overwrite)
    end_processes(state)
    if is_main:
        print(f"wrote {out}")
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    import diffq
    from diffq.plots import plot_bits

    preset = args.preset or "mixed"
    if not diffq.get_preset(preset).is_mixed:
        raise diffq.QuantizationInputError(
            f"--preset {preset!r} is uniform; allocate chooses bits for mixed precision: pass a budget preset "
            "such as w3.5a8, or --budget with the default 'mixed'."
        )
    if args.out:  # refused before minutes of work, not after
        check_file_target(Path(args.out), overwrite=args.overwrite,
                          replaceable=json_has_keys("format_version", "preset", "layers"))
    if args.plot:
        check_file_target(Path(args.plot) / "bits_per_layer.png", overwrite=args.overwrite, replaceable=png_is_ours)
    pipe = diffq.load(args.model)
    call = {k: v for k, v in _call_kwargs(args.model, args).items() if k != "num_inference_steps"}
    prompts = _read_prompts(args.prompts)
    stats = diffq.calibrate(pipe, prompts, num_inference_steps=args.steps, progress=not args.no_progress, **call)
    sens = args.sensitivity or diffq.sensitivity(  # only the candidates this preset chooses among
        pipe, stats, diffq.get_preset(preset).candidates, prompts[:4] if prompts else None,
        num_inference_steps=args.steps, metric=args.sensitivity_metric, include=args.include, exclude=args.exclude,
        progress=not args.no_progress, **call,
    )
    plan = diffq.allocate(pipe, stats, preset=preset, budget=args.budget if preset == "mixed" else None,
                          sensitivity=sens, check=not args.no_check, prompts=prompts[:4] if prompts else None,
                          num_inference_steps=args.steps, call_kwargs=call, temporal_bits=args.temporal_bits,
                          include=args.include, exclude=args.exclude, progress=not args.no_progress)
    print(plan.table())
    if args.out:
        plan.save(args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    if args.plot:
        adapter = diffq.pipelines.adapter_for(diffq.pipelines.denoiser_of(pipe))
        groups = {name: adapter.group_of(name) for name in plan.layers}
        print(f"wrote {plot_bits(plan, args.plot, groups, overwrite=args.overwrite)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import runpy

    app = Path(__file__).resolve().parent.parent / "app.py"
    if not app.exists():
        print("diffq demo: app.py is not installed with this copy of diffq; run it from a source checkout.")
        return 2
    sys.argv = [str(app), "--host", args.host, "--port", str(args.port), "--model", args.model]
    sys.argv += (["--share"] if args.share else []) + (["--threads", str(args.threads)] if args.threads else [])
    runpy.run_path(str(app), run_name="__main__")
    return 0


def layer_selection_flags(p: argparse.ArgumentParser) -> None:
    """``--include`` / ``--exclude``, repeatable: the layers to quantize (diffq.selection)."""
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="quantize only layers matching this glob on layer names (a parent's name selects its "
                        "layers, e.g. 'transformer_blocks') or 'class:Linear'; repeatable")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="keep layers matching this pattern in 16-bit, e.g. 'class:Conv2d' (every convolution) "
                        "or 'time_embedding'; repeatable")


def build_parser() -> argparse.ArgumentParser:
    import diffq

    parser = argparse.ArgumentParser(prog="diffq", description="Quantize diffusers pipelines and run them.")
    parser.add_argument("--version", action="version", version=f"diffq {diffq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it with a model card (DIR/README.md) and DIR/diffq_report.json")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="bundled name, Hub id, local folder, or a single-file .safetensors checkpoint")
    q.add_argument("--pipeline-class", metavar="NAME",
                   help="for a single file: the diffusers pipeline it holds (StableDiffusionPipeline, "
                        "StableDiffusionXLPipeline, FluxPipeline, ...)")
    q.add_argument("--config", metavar="DIR_OR_ID",
                   help="for a single file: a diffusers folder or Hub id of the same architecture for the "
                        "configuration and any components the file lacks (needed offline)")
    q.add_argument("--allow-pickle", action="store_true",
                   help="for a single file: also read pickle checkpoints (.ckpt, .pt), which can run code; trust the file")
    q.add_argument("--preset", default="w4a8", help=f"one of {', '.join(diffq.available_presets())}")
    q.add_argument("--dtype", choices=DTYPES,
                   help="load the float pipeline in this dtype (default float32, as diffusers loads); bfloat16 for "
                        "models published in it, such as FLUX.1, halves the memory calibration needs")
    q.add_argument("--out", required=True,
                   help="folder to write the quantized pipeline to: new, empty, or an earlier diffq checkpoint "
                        "(replaced atomically, other files kept); never the model's own folder")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing file or a folder with other contents at --out")
    q.add_argument("--prompts", help="calibration prompts, one per line")
    q.add_argument("--calibration-steps", type=POSITIVE, default=8)
    q.add_argument("--temporal-bits", type=int, choices=(4, 8), help=TEMPORAL_BITS_HELP)
    q.add_argument("--weight-rounding", choices=("nearest", "gptq"),
                   help="override how the preset rounds weights onto their grid: w4a8, w4a16 and w4a4 use gptq (the "
                        "calibration inputs' Hessian; minutes on large layers), the others nearest")
    layer_selection_flags(q)
    q.add_argument("--sensitivity-metric", choices=("decoupled", "image"), default="decoupled", help=METRIC_HELP)
    q.add_argument("--no-check", action="store_true", help=NO_CHECK_HELP)
    q.add_argument("--low-memory", choices=tuple(LOW_MEMORY), default="auto",
                   help="keep the float denoiser's weights on disk, reading each layer's as it runs (same result); "
                        "auto: when twice its weights exceed the free memory")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate an image with a (quantized) model")
    g.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="bundled name, Hub id, or a saved folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="image.png")
    g.add_argument("--preset", help="quantize on the fly with this preset first")
    g.add_argument("--steps", type=POSITIVE)
    g.add_argument("--guidance-scale", type=_finite(0))
    g.add_argument("--height", type=POSITIVE)
    g.add_argument("--width", type=POSITIVE)
    g.add_argument("--seed", type=NON_NEGATIVE, default=0)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_FILE_HELP)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="compare presets: DIR/report.json, report.md, grid.png (resumes)")
    from diffq.metrics import evaluate

    evaluate.configure_parser(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="per-step activation statistics: save them and/or plot their drift")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    c.add_argument("--plot", help="folder for activation_ranges.png (layers with the widest drift)")
    c.add_argument("--out", help="save the statistics (safetensors + .json)")
    c.add_argument("--prompts", help="calibration prompts, one per line")
    c.add_argument("--steps", type=POSITIVE, default=8, help="denoising steps per prompt (default 8)")
    c.add_argument("--top", type=POSITIVE, default=6, help="how many layers to plot")
    c.add_argument("--guidance-scale", type=_finite(0))
    c.add_argument("--height", type=POSITIVE)
    c.add_argument("--width", type=POSITIVE)
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_FILE_HELP)
    c.set_defaults(func=cmd_calibrate)

    def pipeline_call_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--steps", type=POSITIVE, default=8, help="denoising steps per prompt (default 8)")
        p.add_argument("--prompts", help="prompts, one per line")
        p.add_argument("--guidance-scale", type=_finite(0))
        p.add_argument("--height", type=POSITIVE)
        p.add_argument("--width", type=POSITIVE)
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_FILE_HELP)

    s = sub.add_parser("sensitivity", help="per-layer sensitivity (run under accelerate launch to split layers)")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--out", required=True,
                   help="sensitivity JSON, written after every layer: a rerun of the same command resumes from it "
                        "(as diffq eval resumes from its folder)")
    s.add_argument("--candidates", help="comma-separated, e.g. w2a8,w4a8,w4a8r32,w8a8 (default: all)")
    s.add_argument("--cpu", action="store_true", help="use the CPU even where a GPU exists")
    s.add_argument("--metric", choices=("decoupled", "image"), default="decoupled", help=METRIC_HELP)
    layer_selection_flags(s)
    pipeline_call_flags(s)
    s.set_defaults(func=cmd_sensitivity)

    a = sub.add_parser("allocate", help="mixed precision: bits per layer under a budget, as a table and chart")
    a.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    a.add_argument("--budget", type=_finite(0), default=4.0, help="average weight bits (default 4)")
    a.add_argument("--preset", help="a mixed preset such as w3.5a8 instead of --budget (activations fixed)")
    a.add_argument("--sensitivity", help="a sensitivity JSON from `diffq sensitivity` (else measured, cached)")
    a.add_argument("--plot", help="folder for bits_per_layer.png")
    a.add_argument("--out", help="write the QuantPlan JSON here")
    a.add_argument("--temporal-bits", type=int, choices=(4, 8), help=TEMPORAL_BITS_HELP)
    layer_selection_flags(a)
    a.add_argument("--sensitivity-metric", choices=("decoupled", "image"), default="decoupled", help=METRIC_HELP)
    a.add_argument("--no-check", action="store_true", help=NO_CHECK_HELP)
    pipeline_call_flags(a)
    a.set_defaults(func=cmd_allocate)

    d = sub.add_parser("demo", help="the Gradio demo")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=_whole(1), default=7860)
    d.add_argument("--share", action="store_true", help="a public Gradio link (off by default)")
    d.add_argument("--model", default=DEFAULT_MODEL, help="model pre-filled in the page")
    d.add_argument("--threads", type=POSITIVE, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffq.errors import DiffQError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiffQError as err:
        print(f"diffq: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
