"""The evaluation runner behind ``diffq eval``: generate per preset, score, write reports.

For each preset the model is loaded fresh (``diffq.load``), quantized unless the preset is ``fp``,
and run over the prompts with one seed per image (``seed + global index``). Under
``accelerate launch`` each process generates its share of the batches; the main process gathers the
images, computes the metrics and writes ``report.json``, ``report.md`` and ``grid.png``. Each
preset's images are kept in ``OUT/images/`` as they are made (:mod:`.store`): rerun the same
command after an interruption and it continues where it stopped.

    python -m diffq.metrics.evaluate digits-sd --presets fp,w8a8,w4a8 --num-images 64 --out runs/eval
    accelerate launch --num_processes 2 -m diffq.metrics.evaluate digits-sd --out runs/eval   # 2 GPUs

On CPU, ranks started by torchrun join a gloo group: ``torchrun --nproc_per_node 2 -m
diffq.metrics.evaluate ...``, or ``CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu
--num_processes 2 -m ...``. (``accelerate launch --cpu`` in accelerate 1.x starts one process
whatever ``--num_processes`` says; the runner then simply runs single-process.)

Other quantizers (``benchmarks/quality.py`` compares optimum-quanto and torchao) join the same run
through ``evaluate(..., methods={name: fn})``: each ``fn`` quantizes the freshly loaded pipeline in
place and is scored on the same prompts and seeds as the presets.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffq.distributed import broadcast_object, end_processes, gather_objects, process_state
from diffq.errors import DiffQError
from diffq.metrics.errors import EvaluationInputError
from diffq.metrics.generation import generate_images, shard_batches
from diffq.metrics.prompts import resolve_prompts
from diffq.metrics.scoring import FID_REFERENCE_SPLIT, Scorers
from diffq.metrics.store import ImageStore, is_eval_folder
from diffq.saving import check_target

FP = "fp"
DEFAULT_PRESETS = "fp,w8a8,w4a8"
DEFAULT_MODEL = "digits-sd"
GRID_COLUMNS = 10
DEFAULT_FID_BOOTSTRAP = 100
"""Resamples for FID's spread: well under a second per preset on the digit classifier's 128-d
features; on Inception's 2048-d features each resample takes about a second on a CPU."""


def _flag(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _pattern_list(value: str) -> list[str]:
    return [p for p in value.split("|") if p]


PRESET_OPTIONS = {
    "rank": int, "activations": str, "budget": float, "sensitivity": str, "sensitivity_metric": str, "check": _flag,
    "temporal_bits": int, "weight_rounding": str, "include": _pattern_list, "exclude": _pattern_list,
}

Method = Callable[[Any], int | None]
"""An extra quantizer for :func:`evaluate`: quantizes the pipeline it is given in place and returns
its denoiser's weight bytes, or ``None`` to have them counted by :func:`diffq.weight_bytes`."""


def preset_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"w4a4:rank=0"`` -> ``("w4a4", {"rank": 0})``: a preset and options for ``diffq.quantize``."""
    name, _, options = spec.partition(":")
    parsed: dict[str, Any] = {}
    for item in filter(None, options.split(";")):
        key, _, value = item.partition("=")
        if key not in PRESET_OPTIONS or not value:
            raise EvaluationInputError(
                f"bad preset option {item!r} in {spec!r}; use {', '.join(PRESET_OPTIONS)} as key=value, "
                "e.g. w4a4:rank=0."
            )
        try:
            parsed[key] = PRESET_OPTIONS[key](value)
        except ValueError as err:
            raise EvaluationInputError(f"bad value in {item!r}: {err}") from None
    return name, parsed


def parse_presets(presets: str | Sequence[str]) -> list[str]:
    """Split ``"fp,w8a8"`` (or a list), drop blanks and repeats, and check every name is a preset.

    A preset may carry options for ``diffq.quantize`` after a colon, ``;``-separated:
    ``w4a4:rank=0``, ``mixed:budget=3.5``, ``w8a8-rtn:activations=dynamic``,
    ``w3.5a8:sensitivity=sens.json`` (a saved sensitivity analysis for mixed precision),
    ``w4.0a8:check=false`` (the integer program's plan without the end-to-end check),
    ``w4.0a8:sensitivity_metric=image`` (layers scored by final-image PSNR, not MixDQ's two metrics),
    ``w4a8:temporal_bits=8`` (the temporal modulation layers weight-only too),
    ``w4a8:weight_rounding=gptq`` (GPTQ rounding of the weights),
    ``w4a8:exclude=class:Conv2d|time_embedding`` (layers kept in 16-bit, ``|``-separated patterns;
    ``include=`` likewise).
    """
    import diffq

    names = presets.split(",") if isinstance(presets, str) else list(presets)
    out: list[str] = []
    for name in (str(n).strip() for n in names):
        if name and name not in out:
            out.append(name)
    if not out:
        raise EvaluationInputError("no presets given; pass e.g. --presets fp,w8a8,w4a8.")
    for name in out:
        if name != FP:
            diffq.get_preset(preset_spec(name)[0])  # raises UnknownPresetError listing the valid names
    return out


def default_call_kwargs(model: str) -> dict[str, Any]:
    """Pipeline call settings (steps, guidance, size) of a bundled model or a folder made from one; ``{}`` for others."""
    from diffq.pipelines.call_defaults import call_defaults

    return call_defaults(model)


def _load_fresh(model: str) -> Any:
    import diffq

    return diffq.load(model)


@contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars while a model loads, unless ``show``."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    loggers = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    if not show:
        for m in loggers:
            m.disable_progress_bar()
    try:
        yield
    finally:
        for m in loggers:
            m.enable_progress_bar()


def _stack(images: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    missing = [i for i in range(n) if i not in images]
    if missing:
        raise RuntimeError(f"images {missing[:5]}... were not generated by any process")
    return torch.stack([images[i] for i in range(n)])


def evaluate(
    model: str,
    presets: Sequence[str] | str,
    num_images: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    prompts_file: str | os.PathLike[str] | None = None,
    prompts: Sequence[str | tuple[str, int | None]] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    steps: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    feature_extractor: str = "auto",
    clip_model: str | None = None,
    clip_weights: str | None = None,
    classifier: torch.nn.Module | None = None,
    pipeline_factory: Callable[[str], Any] | None = None,
    device: str | torch.device | None = None,
    methods: Mapping[str, Method] | None = None,
    fid_bootstrap: int = DEFAULT_FID_BOOTSTRAP,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``presets`` of ``model`` on ``num_images`` prompts; returns the report dict.

    The report is ``{"model", "num_images", "feature_extractor", "results": {preset: {"fid", "fid_std",
    "alignment", "clip_score", "psnr_vs_fp", "ssim_vs_fp", "weight_bytes", "seconds"}},
    "fid_differences": {"a vs b": {...}}}`` and is also written to ``out_dir`` (with ``report.md`` and ``grid.png``) when given. ``fp`` is always
    generated when another preset is listed (the reference for PSNR/SSIM). ``pipeline_factory``
    replaces ``diffq.load`` (tests); ``classifier`` replaces the bundled digit classifier; CLIP
    score is computed only when ``clip_model`` and ``clip_weights`` are given. In a distributed run
    every process returns the same report.

    ``fid_bootstrap`` resamples the generated images that many times (0: off) to give ``fid_std``
    and, for every two presets, a paired bootstrap of their FID difference (``fid_differences``:
    ``difference``, its 5th-95th percentile interval ``low``/``high``, and ``a_lower``, the share of
    resamples where the first has the lower FID). Presets share prompts and seeds, so the pairing
    removes most of the sampling noise their FIDs have in common; the real set stays fixed.

    With ``out_dir``, each preset's images are kept there as they are made (:mod:`.store`), and a
    rerun with the same settings continues where an interrupted one stopped and writes the same
    report. ``out_dir`` must be new, empty or an earlier evaluation's folder; another folder with
    files is refused unless ``overwrite=True`` (then only the report's files are replaced in it).

    ``methods`` adds other quantizers, scored like the presets and listed after them: each is
    called with a freshly loaded pipeline, quantizes it in place and returns its denoiser's weight
    bytes (``None``: :func:`diffq.weight_bytes` counts them). Their rows carry an ``"error"`` key:
    ``None``, or the error a method raised while quantizing or generating, with every metric
    ``None`` — a method that cannot run is reported, not dropped, and the run goes on.
    """
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise EvaluationInputError(f"num_images must be a positive integer, got {num_images!r}.")
    if batch_size < 1:
        raise EvaluationInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if steps is not None and steps < 1:
        raise EvaluationInputError(f"steps must be a positive integer, got {steps!r}.")
    if (clip_model is None) != (clip_weights is None):
        raise EvaluationInputError(
            "CLIP score needs both clip_model and clip_weights (a file or a cached tag)."
        )
    listed = parse_presets(presets)
    extra = _checked_methods(methods, listed)
    prompt_list, digits = resolve_prompts(model, num_images, prompts_file=prompts_file, prompts=prompts)
    kwargs = {**default_call_kwargs(model), **(call_kwargs or {})}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if out_dir is not None:
        check_target(Path(out_dir), overwrite=overwrite, is_checkpoint=is_eval_folder)  # before any work

    state = process_state()
    device = torch.device(device) if device is not None else state.device
    scorers = _scorers_or_stop(state, device, feature_extractor, classifier, clip_model, clip_weights, fid_bootstrap,
                               seed)
    run = _Run(
        model, tuple(prompt_list), num_images, shard_batches(num_images, batch_size, state.process_index,
                                                               state.num_processes),
        seed, batch_size, kwargs, device, progress and state.is_main_process, out_dir, pipeline_factory or _load_fresh,
    )
    images: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for preset in [FP] + [p for p in listed if p != FP] + list(extra):  # fp always: listed, or the reference
        stack, info[preset] = _run_preset(run, preset, extra.get(preset), state)
        if stack is not None:
            images[preset] = stack

    report = None
    if state.is_main_process:
        assert scorers is not None
        report = _report(run, listed + list(extra), images, info, scorers, digits, fid_bootstrap, state)
    report = broadcast_object(report, state)
    assert report is not None
    return report


@dataclass(frozen=True)
class _Run:
    """What every preset of one evaluation shares: the model, prompts, seeds, batches and settings."""

    model: str
    prompts: tuple[str, ...]
    num_images: int
    shard: list[range]  # the batches this process generates
    seed: int
    batch_size: int
    call_kwargs: dict[str, Any]
    device: torch.device
    progress: bool  # bars on (the main process only)
    out_dir: str | os.PathLike[str] | None
    factory: Callable[[str], Any]


def _checked_methods(methods: Mapping[str, Method] | None, listed: list[str]) -> dict[str, Method]:
    extra = dict(methods or {})
    for name, method in extra.items():
        if not isinstance(name, str) or not name.strip() or name == FP or name in listed:
            raise EvaluationInputError(
                f"method name {name!r} must be a non-empty string that is not 'fp' or a listed preset."
            )
        if not callable(method):
            raise EvaluationInputError(f"method {name!r} is not callable; pass a function of the pipeline.")
    return extra


def _scorers_or_stop(state: Any, device: torch.device, feature_extractor: str, classifier: Any, clip_model: str | None,
                     clip_weights: str | None, fid_bootstrap: int, seed: int) -> Scorers | None:
    """The main process's scorers, built before anything is generated; every process stops when they
    cannot be (missing weights), not only the main one."""
    scorers, failure = None, None
    if state.is_main_process:
        try:
            scorers = Scorers(feature_extractor, classifier, clip_model, clip_weights, device=device,
                              fid_bootstrap=fid_bootstrap, bootstrap_seed=seed)
        except DiffQError as err:
            failure = err
    failure = broadcast_object(failure, state)
    if failure is not None:
        raise failure
    return scorers


def _run_preset(run: _Run, preset: str, method: Method | None, state: Any) -> tuple[torch.Tensor | None, dict]:
    """Generate one preset's (or method's) images on every process and gather them on the main one:
    ``(images or None, its report fields)``. Stored images are reused (:mod:`.store`)."""
    import diffq
    from diffq.pipelines import denoiser_of

    store = None
    if run.out_dir is not None and method is None:  # another library's method is not identified by its name
        store = ImageStore(run.out_dir, preset,
                           _image_settings(run.model, preset, run.seed, run.batch_size, run.call_kwargs, run.device))
    weight_bytes = store.weight_bytes() if store is not None else None
    pipe = None
    if store is None or weight_bytes is None or store.missing(run.shard, run.prompts):
        with _loading_bars(run.progress):
            pipe = run.factory(run.model)
        if run.device.type != "cpu":
            pipe.to(run.device)
    error, measured = None, None
    try:
        if pipe is not None:
            if method is not None:
                measured = method(pipe)
            elif preset != FP:
                name, options = preset_spec(preset)
                diffq.quantize(pipe, name, progress=run.progress, **options)
            weight_bytes = int(diffq.weight_bytes(denoiser_of(pipe)) if measured is None else measured)
            if store is not None:
                store.record_weight_bytes(weight_bytes)
        local, seconds = generate_images(pipe, list(run.prompts), run.shard, seed=run.seed, call_kwargs=run.call_kwargs,
                                         progress=run.progress, desc=preset, store=store)
    except Exception as err:
        if method is None:
            raise
        # another library's failure is a result, not a crash
        error, local, seconds = " ".join(f"{type(err).__name__}: {err}".split()), {}, 0.0
    del pipe
    gc.collect()
    gathered, all_seconds = gather_objects(list(local.items()), state), gather_objects([seconds], state)
    errors = [e for e in gather_objects([error], state) if e is not None]
    if not state.is_main_process:
        return None, {}
    if errors:
        return None, {"weight_bytes": None, "seconds": None, "error": errors[0]}
    info = {"weight_bytes": weight_bytes, "seconds": round(max(all_seconds), 3)}
    return _stack(dict(gathered), run.num_images), info | ({"error": None} if method is not None else {})


def _report(run: _Run, names: list[str], images: dict[str, torch.Tensor], info: dict[str, dict], scorers: Scorers,
            digits: Any, fid_bootstrap: int, state: Any) -> dict[str, Any]:
    """Score every preset against the real images and ``fp``; write the report files when asked."""
    results = {}
    for p in names:
        if p not in images:  # a method that failed: its error, no metrics
            results[p] = dict.fromkeys(_METRICS) | info[p]
            continue
        reference = images[FP] if p != FP else None
        results[p] = scorers.score(images[p], reference, list(run.prompts), digits, name=p) | info[p]
    report = {
        "model": run.model,
        "num_images": run.num_images,
        "feature_extractor": scorers.feature_name,
        "fid_bootstrap": fid_bootstrap,
        "results": results,
        "fid_differences": scorers.fid_differences(names),
    }
    if run.out_dir is not None:
        from diffq.metrics.report import write_report

        notes = _notes(scorers.num_real, tuple(images[FP].shape[-2:]), run.seed, state.num_processes)
        grid = {p: images[p][:GRID_COLUMNS] for p in results if p in images}
        write_report(run.out_dir, report, grid, notes)
    return report


_METRICS = ("fid", "fid_std", "alignment", "clip_score", "psnr_vs_fp", "ssim_vs_fp")


def _image_settings(model: str, preset: str, seed: int, batch_size: int, call_kwargs: dict[str, Any],
                    device: torch.device) -> dict[str, Any]:
    """What a preset's generated images depend on: stored images are reused only when all of it matches."""
    import diffq

    local = Path(model).expanduser()
    return {
        "model": str(local.resolve()) if local.is_dir() else model,
        "preset": preset,
        "seed": seed,
        "batch_size": batch_size,
        "call_kwargs": call_kwargs,
        "device": device.type,
        "diffq": diffq.__version__,
        "torch": torch.__version__,
    }


def _notes(num_real: int, size: tuple[int, ...], seed: int, num_processes: int) -> list[str]:
    """What the numbers in ``report.md`` mean."""
    return [
        f"FID reference: the {num_real} real digits of the `{FID_REFERENCE_SPLIT}` split of scikit-learn's "
        f"digits (held out from the diffusion models and the classifier), at {size[0]}×{size[1]}.",
        "alignment: fraction of images the digit classifier labels with the prompted digit "
        "(null when no prompt names a digit).",
        f"PSNR/SSIM: against the `{FP}` images of the same prompts and seeds (seed {seed} + image index); "
        "PSNR of identical images is capped at 100 dB.",
        f"seconds: wall time of generation ({num_processes} process(es)); "
        "weights: bytes of the denoiser's parameters and buffers.",
    ]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``diffq eval`` arguments to ``parser``."""
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"bundled name (digits-sd, digits-dit), local folder or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--presets",
        default=DEFAULT_PRESETS,
        help=f"comma-separated presets; 'fp' is full precision (default: {DEFAULT_PRESETS})",
    )
    parser.add_argument("--num-images", type=int, default=64, help="images per preset (default: 64)")
    parser.add_argument(
        "--out",
        default="runs/eval",
        help="output folder (default: runs/eval); each preset's images are kept in OUT/images/ as they are made, "
        "so a rerun of the same command resumes where an interrupted one stopped (as diffq sensitivity does)",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="one prompt per line, optionally 'digit<TAB>prompt' (default: the model's bundled prompts)",
    )
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call (default: 16)")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's default)"
    )
    parser.add_argument(
        "--feature-extractor",
        default="auto",
        choices=["auto", "inception-v3", "digit-classifier"],
        help="FID features; auto = Inception v3 if its weights are on disk, else the digit classifier",
    )
    parser.add_argument(
        "--clip-model", default=None, help="open_clip architecture for CLIP score, e.g. ViT-B-32"
    )
    parser.add_argument(
        "--clip-weights",
        default=None,
        help="CLIP checkpoint file, or an open_clip tag already in the local cache",
    )
    parser.add_argument(
        "--fid-bootstrap",
        type=int,
        default=DEFAULT_FID_BOOTSTRAP,
        metavar="N",
        help=f"resample the images N times for FID's spread and paired differences; 0 = off (default: {DEFAULT_FID_BOOTSTRAP})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds other files (only report.json, report.md, grid.png and "
        "images/ are written there)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``diffq eval`` from parsed arguments; prints the table, returns the exit status."""
    try:
        report = evaluate(
            args.model,
            args.presets,
            args.num_images,
            out_dir=args.out,
            prompts_file=args.prompts,
            seed=args.seed,
            batch_size=args.batch_size,
            steps=args.steps,
            progress=not args.no_progress,
            feature_extractor=args.feature_extractor,
            clip_model=args.clip_model,
            clip_weights=args.clip_weights,
            fid_bootstrap=args.fid_bootstrap,
            overwrite=args.overwrite,
        )
    except DiffQError as err:
        print(f"diffq eval: error: {err}", file=sys.stderr)
        return 1
    state = process_state()
    if state.is_main_process:
        from diffq.metrics.report import render_markdown

        print(render_markdown(report), end="")
        print(f"wrote {os.path.join(args.out, 'report.json')}, report.md and grid.png")
    end_processes(state)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffq.metrics.evaluate`` entry point."""
    parser = argparse.ArgumentParser(
        prog="diffq eval", description="Evaluate quantization presets of a model."
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
