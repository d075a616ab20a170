"""Which parts of the calibrated ``w4a8`` recipe earn their keep: one ``diffq eval`` run of variants.

    python benchmarks/calibration_ablation.py digits-sd --num-images 256 [--variants a-mse,a-minmax,...]
        [--out benchmarks/results/calibration_ablation/MODEL]

Each variant is the ``w4a8`` preset with one :class:`diffq.planning.CalibrationOptions` field
changed (registered in-process as ``w4a8~<variant>``), evaluated next to ``fp``, ``w4a8-rtn`` and
the default ``w4a8`` on the same prompts and seeds.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common import DEFAULT_RESULTS

VARIANTS = {
    "a-mse": {"a_clip": "mse"},
    "a-minmax": {"a_clip": "minmax"},
    "a-percentile": {"a_clip": "percentile"},
    "w-minmax": {"w_clip": "minmax"},
    "no-smoothing": {"smoothing": False},
    "no-step-groups": {"timestep_groups": 1},
    "no-bos": {"bos": False},
    "no-split": {"split_concat": False},
}


def register(names: list[str]) -> list[str]:
    """Register ``w4a8~<name>`` for each variant; returns the preset names."""
    from diffq.planning import CalibrationOptions
    from diffq.presets import PRESETS, Recipe, register_preset

    base = PRESETS["w4a8"]
    presets = []
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        options = replace(base.calibration or CalibrationOptions(), **VARIANTS[name])
        register_preset(Recipe(f"w4a8~{name}", base.layer, f"w4a8 with {VARIANTS[name]}", options))
        presets.append(f"w4a8~{name}")
    return presets


def main(argv: list[str] | None = None) -> int:
    from diffq.metrics.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a bundled model: digits-sd or digits-dit")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    presets = ["fp", "w4a8-rtn", "w4a8"] + register([v.strip() for v in args.variants.split(",") if v.strip()])
    out = args.out or DEFAULT_RESULTS / "calibration_ablation" / args.model
    report = evaluate(args.model, presets, args.num_images, out_dir=out, progress=False)
    for preset, r in report["results"].items():
        psnr = "–" if r["psnr_vs_fp"] is None else f"{r['psnr_vs_fp']:.2f}"
        print(f"{preset:22s} PSNR {psnr:>6s} dB  FID {r['fid']:.3f}  alignment {r['alignment']:.3f}")
    print(f"wrote {out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
