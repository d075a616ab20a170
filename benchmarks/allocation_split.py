"""Joint integer program vs. MixDQ's split budget, measured on the bundled models.

    python benchmarks/allocation_split.py [--models digits-sd,digits-dit] [--budget 4.0]
        [--shares 0.1,0.2,...,0.9] [--num-images 128] [--out benchmarks/results/allocation_split]

diffq allocates mixed-precision bits with one integer program over both metric groups (losses
normalized per group, see ``diffq/allocation.py``). MixDQ instead gives the content layers a share
of the bit budget and the quality layers the rest, solves each group on its own, and scans the
share. This script runs both in one ``diffq eval`` run per model, on the same prompts and seeds,
with the same calibration statistics and the same (cached) sensitivity analysis:
``w<budget>a8:check=false`` is the joint program and ``split-<share>`` the split at each share of
the scan, both without the end-to-end check against the uniform plan. A share that leaves a group
fewer bits than its smallest candidates needs is listed with that error.

Writes ``results.md`` / ``results.json`` (and one ``diffq eval`` report per model) to ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import DEFAULT_RESULTS, machine_line, markdown, publish

MODELS = ["digits-sd", "digits-dit"]
SHARES = [round(0.1 * k, 1) for k in range(1, 10)]


class SplitMethods:
    """``split_method(share)`` quantizes a pipeline like ``diffq.quantize(pipe, preset)`` but with the
    budget split at ``share``. Calibration and the sensitivity analysis (``quantize()``'s own, from
    the same cache entry) run once, on the first pipeline, and serve every share: the pipelines are
    fresh loads of the same float model."""

    def __init__(self, preset: str) -> None:
        self.preset = preset
        self.measured: tuple[Any, Any] | None = None

    def _measure(self, pipe: Any) -> tuple[Any, Any]:
        import diffq
        from diffq.pipelines.calibrate import default_prompts

        if self.measured is None:
            candidates = list(diffq.get_preset(self.preset).candidates)
            stats = diffq.calibrate(pipe, progress=False)  # what quantize() calibrates with by default
            sensitivity = diffq.sensitivity(pipe, stats, candidates, default_prompts(pipe)[:4], progress=False)
            self.measured = stats, sensitivity
        return self.measured

    def split_method(self, share: float) -> Callable[[Any], None]:
        def apply(pipe: Any) -> None:
            import diffq

            stats, sensitivity = self._measure(pipe)
            # check=False: this compares the allocation methods themselves, not the end-to-end guard
            plan = diffq.allocate(pipe, stats, preset=self.preset, sensitivity=sensitivity, content_share=share,
                                  check=False, progress=False)
            diffq.convert(pipe, plan, stats, progress=False)

        return apply


def content_fraction(model: str) -> float:
    """The fraction of the quantized parameters that sit in content layers (a uniform plan's share)."""
    import diffq
    from diffq.pipelines import adapter_for, denoiser_of

    denoiser = denoiser_of(diffq.load(model))
    adapter = adapter_for(denoiser)
    layers, _ = adapter.layers(denoiser)
    params = {n: m.weight.numel() for n, m in layers.items()}
    content = sum(p for n, p in params.items() if adapter.group_of(n) == "content")
    return content / sum(params.values())


def main(argv: list[str] | None = None) -> int:
    from diffq.metrics.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budget", type=float, default=4.0)
    parser.add_argument("--shares", default=",".join(map(str, SHARES)))
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_RESULTS / "allocation_split"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = f"w{args.budget:.1f}a8"
    joint = f"{preset}:check=false"  # the program's own plan, like the split rows (no end-to-end check)
    shares = [float(s) for s in args.shares.split(",") if s.strip()]
    out = Path(args.out)
    sections, data = [], {"machine": machine_line(), "budget": args.budget, "models": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        splits = SplitMethods(preset)
        methods = {f"split-{s:g}": splits.split_method(s) for s in shares}
        report = evaluate(model, ["fp", joint], args.num_images, out_dir=out / model, seed=args.seed,
                          methods=methods, progress=not args.no_progress)
        rows = []
        for name, r in report["results"].items():
            if name == "fp":
                continue
            kind = "joint" if name == joint else "split"
            cells = [kind, name.removeprefix("split-") if kind == "split" else "–"]
            if r.get("error"):
                rows.append(cells + [None, None, None, None, r["error"]])
                continue
            rows.append(cells + [f"{r['psnr_vs_fp']:.2f}", f"{r['ssim_vs_fp']:.4f}", f"{r['fid']:.3f}",
                                 f"{r['alignment']:.3f}", ""])
        fraction = content_fraction(model)
        table = markdown(["program", "content share", "PSNR vs fp (dB)", "SSIM vs fp", "FID", "alignment", "error"], rows)
        sections.append(f"### {model} at {args.budget:g} average weight bits\n\nContent layers hold "
                        f"{fraction:.1%} of the quantized parameters (a uniform plan's share).\n\n{table}\n")
        data["models"][model] = {"content_fraction": fraction, "report": report}
    publish(out, "\n".join(sections), data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
