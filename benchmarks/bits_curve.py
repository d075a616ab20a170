"""Quality against average weight bits: mixed precision next to the uniform presets, from eval reports.

    python benchmarks/bits_curve.py benchmarks/results/digits-sd benchmarks/results/digits-dit \
        [--out benchmarks/results/bits_curve]

Reads the ``report.json`` that ``diffq eval`` wrote into each folder. Mixed-precision rows are the
mixed presets with 8-bit activations (``w3a8``, ``w3.5a8``, ``w4.0a8``, ...); the uniform ``a8``
presets (``w4a8``, ``w8a8``, and their ``-rtn`` baselines) are the points they are compared with. Average weight bits are counted as the allocator counts them: code bits
over the quantized parameters, a 16-bit low-rank branch included, scales not (a uniform ``w4a8``
is 4.0). Writes ``results.md``, ``results.json`` and ``bits_curve.png`` (PSNR vs fp and FID
against average weight bits, one line per model) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import DEFAULT_RESULTS, markdown, write_results


def curve_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``a8`` preset of a report (mixed, uniform and ``-rtn``), sorted by kind and bits."""
    import diffq

    rows = []
    for preset, result in report["results"].items():
        if preset == "fp" or ":" in preset:  # presets with options are not points of the curve
            continue
        recipe = diffq.get_preset(preset)
        if recipe.is_mixed and all(c.a_bits == 8 for c in recipe.candidates):
            kind, bits = "mixed", recipe.budget
        elif not recipe.is_mixed and recipe.layer.a_bits == 8:
            kind, bits = ("rtn" if preset.endswith("-rtn") else "uniform"), float(recipe.layer.w_bits)
        else:
            continue
        rows.append({"model": report["model"], "preset": preset, "kind": kind, "bits": bits,
                     "psnr_vs_fp": result["psnr_vs_fp"], "fid": result["fid"], "alignment": result["alignment"]})
    order = {"mixed": 0, "uniform": 1, "rtn": 2}
    return sorted(rows, key=lambda r: (order[r["kind"]], r["bits"]))


def plot(rows: list[dict[str, Any]], fp_fid: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for color, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], models, strict=False):
        for ax, metric in zip(axes, ("psnr_vs_fp", "fid"), strict=True):
            mixed = [r for r in rows if r["model"] == model and r["kind"] == "mixed"]
            ax.plot([r["bits"] for r in mixed], [r[metric] for r in mixed], "o-", color=color,
                    label=f"{model} mixed")
            for kind, marker in (("uniform", "s"), ("rtn", "x")):
                pts = [r for r in rows if r["model"] == model and r["kind"] == kind]
                ax.plot([r["bits"] for r in pts], [r[metric] for r in pts], marker, color=color, linestyle="none",
                        markersize=8, label=f"{model} uniform{' rtn' if kind == 'rtn' else ''}")
            if metric == "fid" and model in fp_fid:
                ax.axhline(fp_fid[model], color=color, linestyle=":", linewidth=1, label=f"{model} fp")
    axes[0].set(xlabel="average weight bits", ylabel="PSNR vs fp (dB) ↑", title="fidelity to full precision")
    axes[1].set(xlabel="average weight bits", ylabel="FID ↓", title="FID (digit-classifier features)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="folders (or report.json files) written by `diffq eval`")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS / "bits_curve"))
    args = parser.parse_args(argv)
    rows, fp_fid, sources = [], {}, []
    for item in args.reports:
        path = Path(item) / "report.json" if Path(item).is_dir() else Path(item)
        if not path.is_file():
            print(f"error: no eval report at {path}; run `diffq eval MODEL --out DIR` first.", file=sys.stderr)
            return 2
        report = json.loads(path.read_text())
        rows += curve_rows(report)
        fp_fid[report["model"]] = report["results"].get("fp", {}).get("fid")
        sources.append(str(path))
    if not any(r["kind"] == "mixed" for r in rows):
        print("error: the reports hold no mixed-precision preset (e.g. w3.5a8, w4.0a8).", file=sys.stderr)
        return 2
    header = ["model", "preset", "kind", "avg weight bits", "PSNR vs fp (dB)", "FID", "alignment"]
    table = markdown(header, [[r["model"], r["preset"], r["kind"], f"{r['bits']:g}", f"{r['psnr_vs_fp']:.2f}",
                               f"{r['fid']:.3f}", f"{r['alignment']:.3f}"] for r in rows])
    text = f"{table}\n\nFrom: {', '.join(sources)}.\n"
    print(text)
    out = Path(args.out)
    write_results(out, text, {"sources": sources, "rows": rows})
    plot(rows, fp_fid, out / "bits_curve.png")
    print(f"wrote {out / 'results.md'} and {out / 'bits_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
