"""Quality against weight bytes on the bundled models: diffq's presets next to optimum-quanto and torchao.

    python benchmarks/quality.py [--models digits-sd,digits-dit] [--num-images 64]
        [--presets w8a8-rtn,w8a8,w4a8-rtn,w4a8,w4a4,w4.0a8,w3.5a8] [--peers quanto-w8a8,...|none]
        [--sensitivity [MODEL=]FILE ...] [--out benchmarks/results/quality]

One :func:`diffq.metrics.evaluate.evaluate` run per model: full precision, every diffq preset and
every peer configuration generate the same prompts with the same per-image seeds, and are scored
alike (``fid``, ``alignment``, ``psnr_vs_fp``, ``ssim_vs_fp``) next to the denoiser's weight bytes.
Peers quantize the denoiser only, as diffq does, with their default module selection:

* ``quanto-w8a8``: optimum-quanto ``quantize(denoiser, weights=qint8, activations=qint8)``, then the
  pipeline runs under quanto's ``Calibration()`` on the prompts and steps diffq calibrates with (the
  model's default calibration prompts, 8 steps each), then ``freeze``;
* ``quanto-w4a16`` (and ``quanto-w8a16``): ``weights=qint4`` (``qint8``), no activations, ``freeze``;
* ``torchao-w8a8``: torchao ``quantize_(denoiser, Int8DynamicActivationInt8WeightConfig())``
  (int8 weights, dynamic per-token int8 activations);
* ``torchao-w8a16``: ``Int8WeightOnlyConfig()``;
* ``torchao-w4a16``: ``Int4WeightOnlyConfig(group_size=128)`` — torchao's int4 weight-only config;
* ``torchao-w4a16-intx``: ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``,
  torchao's int4 path for CPUs (it stores one code per byte).

Weight bytes of peers count what their quantized tensors hold (packed data, scales, zero points:
``memory.stored_bytes``), not the dense size their tensor subclasses report. A configuration that
cannot run here (a library not installed — ``pip install -e '.[bench]'`` — or a kernel missing on
this device) is listed with the error it gave.

Mixed precision (``w4.0a8``, ``w3.5a8``) runs diffq's per-layer sensitivity analysis first (slow;
cached under ``~/.cache/diffq``) unless ``--sensitivity`` gives a saved one (``diffq.sensitivity``
→ ``Sensitivity.save``), per model as ``MODEL=FILE``.

Writes ``results.md``, ``results.json`` and ``quality_vs_bytes.png`` (PSNR vs fp against weight
MiB, every method) to ``--out``, and each model's evaluation report (``report.json``, ``report.md``,
``grid.png``) to ``--out/MODEL/``.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results
from memory import stored_bytes

MODELS = ["digits-sd", "digits-dit"]
DIFFQ_PRESETS = ["w8a8-rtn", "w8a8", "w4a8-rtn", "w4a8", "w4a4", "w4.0a8", "w3.5a8"]
CALIBRATION_STEPS = 8  # diffq.quantize's default num_calibration_steps


@dataclass(frozen=True)
class PeerContext:
    """What a peer needs besides the pipeline: how to run calibration passes like diffq does."""

    prompts: Sequence[str] | None = None  # None: the pipeline's default calibration prompts
    steps: int = CALIBRATION_STEPS
    seed: int = 0
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)  # on top of the bundled model's defaults


def _calibration_passes(pipe: Any, ctx: PeerContext) -> None:
    """Run ``pipe`` over the calibration prompts, one prompt per call, as ``diffq.calibrate`` does."""
    from diffq.pipelines.calibrate import conditioning, default_call_kwargs, default_prompts

    prompts = list(ctx.prompts) if ctx.prompts is not None else default_prompts(pipe)
    kwargs = {**default_call_kwargs(pipe), **ctx.call_kwargs}
    kwargs.pop("num_inference_steps", None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            pipe(**conditioning(pipe, [prompt]), num_inference_steps=ctx.steps, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(ctx.seed + i), **kwargs)


def quanto(weights: str, activations: str | None = None) -> Callable[[PeerContext], Callable[[Any], int]]:
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            from optimum import quanto as q

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            q.quantize(denoiser, weights=getattr(q, weights), activations=activations and getattr(q, activations))
            if activations:
                with q.Calibration():
                    _calibration_passes(pipe, ctx)
            q.freeze(denoiser)
            return stored_bytes(denoiser)

        return apply

    return make


def torchao(config: Callable[[], Any]) -> Callable[[PeerContext], Callable[[Any], int]]:
    def make(ctx: PeerContext) -> Callable[[Any], int]:
        def apply(pipe: Any) -> int:
            from torchao.quantization import quantize_

            from diffq.pipelines import denoiser_of

            denoiser = denoiser_of(pipe)
            quantize_(denoiser, config())
            return stored_bytes(denoiser)

        return apply

    return make


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4_weight_only():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=128)


def _intx4_weight_only():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


PEERS: dict[str, Callable[[PeerContext], Callable[[Any], int]]] = {
    "quanto-w8a8": quanto("qint8", "qint8"),
    "quanto-w8a16": quanto("qint8"),
    "quanto-w4a16": quanto("qint4"),
    "torchao-w8a8": torchao(_int8_dynamic),
    "torchao-w8a16": torchao(_int8_weight_only),
    "torchao-w4a16": torchao(_int4_weight_only),
    "torchao-w4a16-intx": torchao(_intx4_weight_only),
}
DEFAULT_PEERS = ["quanto-w8a8", "quanto-w4a16", "torchao-w8a8", "torchao-w8a16", "torchao-w4a16",
                 "torchao-w4a16-intx"]


def library(method: str) -> str:
    if method == "fp":
        return "–"
    return method.split("-")[0] if method in PEERS else "diffq"


def preset_specs(presets: Sequence[str], sensitivity: str | None) -> list[str]:
    """Preset specs for ``evaluate``; mixed-precision ones carry the sensitivity file when given."""
    import diffq

    specs = []
    for preset in presets:
        name = preset.partition(":")[0]
        if sensitivity and diffq.get_preset(name).is_mixed and "sensitivity=" not in preset:
            preset += (";" if ":" in preset else ":") + f"sensitivity={sensitivity}"
        specs.append(preset)
    return specs


def parse_sensitivity(values: Sequence[str], models: Sequence[str]) -> dict[str, str]:
    """``MODEL=FILE`` entries (or one bare ``FILE`` for every model) -> ``{model: file}``."""
    out: dict[str, str] = {}
    for value in values:
        model, sep, path = value.partition("=")
        if sep and model in models:
            out[model] = path
        elif not sep:
            out.update(dict.fromkeys(models, value))
        else:
            raise ValueError(f"--sensitivity {value!r}: {model!r} is not one of the models {list(models)}")
    return out


def display_name(spec: str) -> str:
    """A preset spec without its ``sensitivity=FILE`` option (the file is named in the JSON)."""
    name, _, options = spec.partition(":")
    kept = [o for o in options.split(";") if o and not o.startswith("sensitivity=")]
    return name + (":" + ";".join(kept) if kept else "")


def rows_of(model: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    fp_bytes = report["results"]["fp"]["weight_bytes"]
    rows = []
    for method, r in report["results"].items():
        b = r["weight_bytes"]
        rows.append({
            "model": model, "method": display_name(method), "spec": method, "library": library(method),
            **{k: r[k] for k in ("fid", "alignment", "psnr_vs_fp", "ssim_vs_fp", "weight_bytes", "seconds")},
            "vs_fp": None if b is None else b / fp_bytes,
            "status": r.get("error") or "ok",
        })
    return rows


def run(
    models: Sequence[str],
    presets: Sequence[str],
    peers: Sequence[str],
    num_images: int,
    out: Path,
    *,
    sensitivity: Mapping[str, str] | None = None,
    seed: int = 0,
    progress: bool = True,
    peer_context: PeerContext | None = None,
    **evaluate_options: Any,
) -> dict[str, Any]:
    """Evaluate every model; write the tables, JSON and plot into ``out``; return the results.

    ``evaluate_options`` go to :func:`diffq.metrics.evaluate.evaluate` (``batch_size``, and the
    tests' ``pipeline_factory``, ``prompts``, ``call_kwargs``, ``classifier``, ``steps``).
    """
    from diffq.metrics.evaluate import evaluate

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {', '.join(PEERS)}")
    info = machine()
    ctx = peer_context or PeerContext()  # calibration seeds 0.., as diffq.calibrate uses
    reports: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for model in models:
        specs = preset_specs(presets, (sensitivity or {}).get(model))
        methods = {name: PEERS[name](ctx) for name in peers}
        report = evaluate(model, ["fp", *specs], num_images, out_dir=out / model, seed=seed, progress=progress,
                          methods=methods, **evaluate_options)
        reports[model] = report
        rows += rows_of(model, report)
    data = {"machine": info, "num_images": num_images, "seed": seed, "rows": rows, "reports": reports}
    text = render(rows, data)
    write_results(out, text, data)
    plot(rows, out / "quality_vs_bytes.png")
    print(text)
    return data


def render(rows: list[dict[str, Any]], data: dict[str, Any]) -> str:
    def f(value: float | None, spec: str) -> str | None:
        return None if value is None else format(value, spec)

    table = markdown(
        ["model", "method", "library", "FID ↓", "alignment ↑", "PSNR vs fp (dB) ↑", "SSIM vs fp ↑",
         "weights (MiB)", "x fp", "seconds", "status"],
        [[r["model"], r["method"], r["library"], f(r["fid"], ".4g"), f(r["alignment"], ".3f"),
          f(r["psnr_vs_fp"], ".2f"), f(r["ssim_vs_fp"], ".3f"), mib(r["weight_bytes"]), f(r["vs_fp"], ".3f"),
          f(r["seconds"], ".1f"), "ok" if r["status"] == "ok" else "failed (below)"] for r in rows],
    )
    failed = [f"- `{r['method']}` on {r['model']}: {r['status']}" for r in rows if r["status"] != "ok"]
    extractors = {m: rep["feature_extractor"] for m, rep in data["reports"].items()}
    parts = [
        "**Quality vs weight bytes, diffq and its peers** (`python benchmarks/quality.py`)",
        f"{data['num_images']} images per method and model, the same prompts and seeds (seed {data['seed']} "
        f"+ image index) for every method; FID features: "
        + ", ".join(f"{m}: `{e}`" for m, e in extractors.items())
        + ". PSNR/SSIM against the full-precision images; weights: bytes the denoiser's tensors store "
        "(x fp: against the float model); seconds: wall time of generation.",
        table,
    ]
    if failed:
        parts.append("Configurations that did not run here, with the error each gave:\n\n" + "\n".join(failed))
    parts.append(machine_line(data["machine"]))
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """PSNR vs fp against weight MiB, one panel per model, every method that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffq.metrics.report import atomic_write_bytes

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    styles = {"diffq": ("tab:blue", "o"), "quanto": ("tab:orange", "s"), "torchao": ("tab:green", "^")}
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for r in mine:
            if r["method"] == "fp" and r["weight_bytes"] is not None:
                ax.axvline(r["weight_bytes"] / 2**20, color="gray", linestyle="--", label="fp weights")
        for lib, (color, marker) in styles.items():
            points = [r for r in mine if r["library"] == lib and r["psnr_vs_fp"] is not None]
            if not points:
                continue
            xs = [r["weight_bytes"] / 2**20 for r in points]
            ys = [min(r["psnr_vs_fp"], 100.0) for r in points]
            ax.scatter(xs, ys, color=color, marker=marker, label=lib, zorder=3)
            for x, y, r in zip(xs, ys, points, strict=True):
                ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(model)
        ax.set_xlabel("denoiser weights (MiB)")
        ax.set_ylabel("PSNR vs fp (dB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _names(value: str, default: Sequence[str]) -> list[str]:
    if value == "none":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()] if value else list(default)
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated bundled models")
    parser.add_argument("--presets", default=",".join(DIFFQ_PRESETS),
                        help="comma-separated diffq presets (options after ':', e.g. w4a4:rank=0); 'none' for none")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated, from {', '.join(PEERS)}; 'none' for none")
    parser.add_argument("--num-images", type=int, default=64, help="images per method and model (default: 64)")
    parser.add_argument("--sensitivity", action="append", default=[], metavar="[MODEL=]FILE",
                        help="saved sensitivity analysis for the mixed presets (repeat per model)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "quality", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    models = _names(args.models, MODELS)
    try:
        sensitivity = parse_sensitivity(args.sensitivity, models)
    except ValueError as err:
        parser.error(str(err))
    peers = _names(args.peers, DEFAULT_PEERS)
    if [p for p in peers if p not in PEERS]:
        parser.error(f"unknown peer in {peers}; choose from {', '.join(PEERS)}")
    data = run(models, _names(args.presets, DIFFQ_PRESETS), peers, args.num_images, args.out,
               sensitivity=sensitivity, seed=args.seed, progress=not args.no_progress, batch_size=args.batch_size)
    print(f"wrote {args.out}/results.md, results.json, quality_vs_bytes.png and one report folder per model "
          f"({', '.join(data['reports'])})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
