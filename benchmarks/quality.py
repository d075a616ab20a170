"""Quality against weight bytes on the bundled models: diffq's presets next to optimum-quanto, torchao, NVIDIA ModelOpt and SDNQ.

    python benchmarks/quality.py [--models digits-sd,digits-dit] [--num-images 64]
        [--presets w8a8-rtn,w8a8,w4a8-rtn,w4a8,w4a4,w4.0a8,w3.5a8] [--peers quanto-w8a8,...|none]
        [--sensitivity [MODEL=]FILE ...] [--out benchmarks/results/quality]

One :func:`diffq.metrics.evaluate.evaluate` run per model: full precision, every diffq preset and
every peer configuration generate the same prompts with the same per-image seeds, and are scored
alike (``fid``, ``alignment``, ``psnr_vs_fp``, ``ssim_vs_fp``) next to the denoiser's weight bytes.
Peers quantize the denoiser only, as diffq does (their code is in ``peers.py``). "Calibrated" below
means: the pipeline runs on the prompts and steps diffq calibrates with (the model's default
calibration prompts, 8 steps each).

* ``quanto-w8a8``: optimum-quanto ``quantize(denoiser, weights=qint8, activations=qint8)``, calibrated
  under quanto's ``Calibration()``, then ``freeze``; ``quanto-w4a16`` (and ``quanto-w8a16``):
  ``weights=qint4`` (``qint8``), no activations, ``freeze``. optimum-quanto is deprecated in
  diffusers (since 2026-03); it stays for comparison with earlier results.
* ``torchao-w8a8``: torchao ``quantize_(denoiser, Int8DynamicActivationInt8WeightConfig())``
  (int8 weights, dynamic per-token int8 activations); ``torchao-w8a16``: ``Int8WeightOnlyConfig()``;
  ``torchao-w4a16``: ``Int4WeightOnlyConfig(group_size=128)`` (needs CUDA);
  ``torchao-w4a16-intx``: ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``,
  torchao's int4 path for CPUs (it stores one code per byte).
* NVIDIA ModelOpt, ``mtq.quantize(denoiser, CONFIG, forward_loop)`` with the calibration passes as
  ``forward_loop``: ``modelopt-int8-sq`` (``INT8_SMOOTHQUANT_CFG``), ``modelopt-w4a8-awq``
  (``W4A8_AWQ_BETA_CFG``), ``modelopt-int4-awq`` (``INT4_AWQ_CFG``, weight-only),
  ``modelopt-nvfp4-svdquant`` (``NVFP4_SVDQUANT_DEFAULT_CFG``) and ``modelopt-w4a8-nvfp4-fp8``
  (``W4A8_NVFP4_FP8_CFG``); the two NVFP4 ones need CUDA (ModelOpt 0.47's dynamic block
  quantization asserts a CUDA ``amax``).
* SDNQ ``sdnq_post_load_quant(denoiser, weights_dtype=...)`` (weight-only, no calibration):
  ``sdnq-int8``, ``sdnq-uint4`` and ``sdnq-uint4-svd`` (``use_svd=True`` at SDNQ's default rank 32).

Scope: a bare ModelOpt/SDNQ name uses the library's default module selection (ModelOpt: every Linear
and Conv2d but ``*proj_out.*``; SDNQ: Linear layers of at least 16384 weights and 32 input
channels, no convolutions, its skip keys); ``NAME@diffq`` quantizes exactly the layers diffq
quantizes (convolutions included; first/last layers, time/condition embeddings and the layers
reading the timestep embedding stay float). quanto and torchao run at their defaults only.

Weight bytes of peers count what they store: quanto's and torchao's tensor subclasses by their
packed data, scales and zero points (``memory.stored_bytes``), not the dense size they report;
SDNQ's plain packed tensors, scales, zero points and SVD factors as they are; ModelOpt's
fake-quantized models as its export writes them (``peers.modelopt_stored_bytes``: packed codes,
float32 scales, ``pre_quant_scale`` vectors, SVDQuant factors; its quantizers' calibration buffers
not counted). A configuration that cannot run here (a library not installed —
``pip install -e '.[bench]'`` — or a kernel missing on this device) is listed with the error it gave.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import DEFAULT_RESULTS, machine, machine_line, markdown, mib, write_results
from peers import DEFAULT_PEERS, DEPRECATED, PEERS, PeerContext, library, scope_of

MODELS = ["digits-sd", "digits-dit"]
DIFFQ_PRESETS = ["w8a8-rtn", "w8a8", "w4a8-rtn", "w4a8", "w4a4", "w4.0a8", "w3.5a8"]


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
            "scope": scope_of(method),
            **{k: r[k] for k in ("fid", "alignment", "psnr_vs_fp", "ssim_vs_fp", "weight_bytes", "seconds")},
            "vs_fp": None if b is None else b / fp_bytes,
            "status": r.get("error") or "ok",
        })
    return rows


PROMPT_SETS = ("held-out", "calibration", "bundled")
CALIBRATION_PROMPTS = 8  # the bundled models calibrate on their first 8 evaluation prompts (default_prompts)


PROMPT_SET_TEXT = {
    "held-out": "the bundled evaluation prompts after the 8 every method calibrated on (held out)",
    "calibration": "the 8 prompts every method calibrated on, cycled (seeds differ from calibration's past the 8th)",
    "bundled": "the bundled evaluation prompts from the first, the first 8 being the calibration prompts",
}


def prompts_of(prompt_set: str, num_images: int) -> list[tuple[str, int]]:
    """The bundled ``(prompt, digit)`` pairs of a prompt set (``evaluate`` cycles a short list)."""
    from diffq.pipelines.reference import eval_prompts

    if prompt_set == "held-out":
        return eval_prompts(num_images + CALIBRATION_PROMPTS)[CALIBRATION_PROMPTS:]
    if prompt_set == "calibration":
        return eval_prompts(CALIBRATION_PROMPTS)
    if prompt_set == "bundled":
        return eval_prompts(num_images)
    raise ValueError(f"unknown prompt set {prompt_set!r}; choose from {', '.join(PROMPT_SETS)}")


def combine(folders: Sequence[Path], out: Path) -> dict[str, Any]:
    """One table, JSON and plot at ``out`` from the ``results.json`` of earlier runs: runs of different
    models made side by side, or runs of one model with other methods (same images, seeds and prompt
    set; a method already in an earlier run is taken from the first)."""
    import json

    parts = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    settings = {(p["num_images"], p["seed"], p.get("prompt_set")) for p in parts}
    if len(settings) > 1:
        raise ValueError(f"the runs used different images, seeds or prompt sets: {sorted(settings, key=str)}")
    reports: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for part in parts:
        for model, report in part["reports"].items():
            merged = reports.setdefault(model, {**report, "results": {}})
            merged["results"] = {**report["results"], **merged["results"]}
        for row in part["rows"]:
            if (row["model"], row["spec"]) not in seen:
                seen.add((row["model"], row["spec"]))
                rows.append(row)
    order = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: (order.index(r["model"]), r["library"] != "–", r["library"] != "diffq"))
    data = {**parts[0], "rows": rows, "reports": reports, "combined_from": [str(f) for f in folders]}
    text = render(data["rows"], data)
    write_results(out, text, data)
    plot(data["rows"], out / "quality_vs_bytes.png")
    print(text)
    return data


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
    prompt_set: str | None = None,
    **evaluate_options: Any,
) -> dict[str, Any]:
    """Evaluate every model; write the tables, JSON and plot into ``out``; return the results.

    ``prompt_set`` (:data:`PROMPT_SETS`) picks the bundled prompts; ``evaluate_options`` go to
    :func:`diffq.metrics.evaluate.evaluate` (``batch_size``, and the tests' ``pipeline_factory``,
    ``prompts``, ``call_kwargs``, ``classifier``, ``steps``).
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
        prompts = {"prompts": prompts_of(prompt_set, num_images)} if prompt_set else {}
        report = evaluate(model, ["fp", *specs], num_images, out_dir=out / model, seed=seed, progress=progress,
                          methods=methods, **prompts, **evaluate_options)
        reports[model] = report
        rows += rows_of(model, report)
    data = {"machine": info, "num_images": num_images, "seed": seed, "prompt_set": prompt_set or "given",
            "rows": rows, "reports": reports}
    text = render(rows, data)
    write_results(out, text, data)
    plot(rows, out / "quality_vs_bytes.png")
    print(text)
    return data


def render(rows: list[dict[str, Any]], data: dict[str, Any]) -> str:
    def f(value: float | None, spec: str) -> str | None:
        return None if value is None else format(value, spec)

    def lib(name: str) -> str:
        return f"{name} (deprecated)" if name in DEPRECATED else name

    table = markdown(
        ["model", "method", "library", "scope", "FID ↓", "alignment ↑", "PSNR vs fp (dB) ↑", "SSIM vs fp ↑",
         "weights (MiB)", "x fp", "seconds", "status"],
        [[r["model"], r["method"], lib(r["library"]), r.get("scope", "–"), f(r["fid"], ".4g"), f(r["alignment"], ".3f"),
          f(r["psnr_vs_fp"], ".2f"), f(r["ssim_vs_fp"], ".3f"), mib(r["weight_bytes"]), f(r["vs_fp"], ".3f"),
          f(r["seconds"], ".1f"), "ok" if r["status"] == "ok" else "failed (below)"] for r in rows],
    )
    failed = [f"- `{r['method']}` on {r['model']}: {r['status']}" for r in rows if r["status"] != "ok"]
    extractors = {m: rep["feature_extractor"] for m, rep in data["reports"].items()}
    parts = [
        "**Quality vs weight bytes, diffq and its peers** (`python benchmarks/quality.py`)",
        f"{data['num_images']} images per method and model, the same prompts and seeds (seed {data['seed']} "
        f"+ image index) for every method; prompts: {PROMPT_SET_TEXT.get(data.get('prompt_set'), 'as given')}; "
        "FID features: "
        + ", ".join(f"{m}: `{e}`" for m, e in extractors.items())
        + ". PSNR/SSIM against the full-precision images; weights: bytes the denoiser's tensors store "
        "(x fp: against the float model); seconds: wall time of generation. Scope: a peer's own default "
        "module selection, or `diffq` (`@diffq`: exactly the layers diffq quantizes).",
        table,
    ]
    shown = {r["library"] for r in rows}
    notes = [f"{name}: {why}." for name, why in DEPRECATED.items() if name in shown]
    if notes:
        parts.append(" ".join(notes))
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
    styles = {"diffq": ("tab:blue", "o"), "quanto": ("tab:orange", "s"), "torchao": ("tab:green", "^"),
              "modelopt": ("tab:red", "D"), "sdnq": ("tab:purple", "v")}
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for r in mine:
            if r["method"] == "fp" and r["weight_bytes"] is not None:
                ax.axvline(r["weight_bytes"] / 2**20, color="gray", linestyle="--", label="fp weights")
        for lib, (color, marker) in styles.items():
            for at_diffq in (False, True):  # a peer at diffq's scope: the same marker, hollow
                points = [r for r in mine if r["library"] == lib and r["psnr_vs_fp"] is not None
                          and (r.get("scope") == "diffq") == at_diffq]
                if not points:
                    continue
                xs = [r["weight_bytes"] / 2**20 for r in points]
                ys = [min(r["psnr_vs_fp"], 100.0) for r in points]
                style = {"facecolors": "none", "edgecolors": color} if at_diffq else {"color": color}
                ax.scatter(xs, ys, marker=marker, label=lib + (" @diffq" if at_diffq else ""), zorder=3, **style)
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
    parser.add_argument("--prompt-set", choices=PROMPT_SETS, default="held-out",
                        help="held-out: the bundled evaluation prompts after the calibration ones (default); "
                             "calibration: the prompts every method calibrated on, cycled; bundled: the bundled "
                             "evaluation prompts from the first (which are the calibration prompts)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="DIR",
                        help="write one table and plot at --out from earlier runs' folders (e.g. one per model, "
                             "run side by side) instead of running anything")
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
    if args.combine:
        data = combine(args.combine, args.out)
        print(f"wrote {args.out}/results.md, results.json and quality_vs_bytes.png from {len(args.combine)} runs",
              file=sys.stderr)
        return 0
    data = run(models, _names(args.presets, DIFFQ_PRESETS), peers, args.num_images, args.out,
               sensitivity=sensitivity, seed=args.seed, progress=not args.no_progress, batch_size=args.batch_size,
               prompt_set=args.prompt_set)
    print(f"wrote {args.out}/results.md, results.json, quality_vs_bytes.png and one report folder per model "
          f"({', '.join(data['reports'])})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
