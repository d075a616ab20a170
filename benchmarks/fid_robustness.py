"""Is FID's verdict on the bundled models an artefact of its small reference set?

    python benchmarks/fid_robustness.py [--model digits-dit] [--presets fp,w4a8-rtn,w4a8]
        [--num-images 1024] [--references classifier_test,diffusion] [--bootstrap 100]
        [--out benchmarks/results/fid_robustness]

``diffq eval`` scores FID against the 216 real digits held out from every model
(``classifier_test``). Fréchet distances estimated from few samples are biased, and on the bundled
models full precision does not always score best. This script generates the presets' images
exactly as ``diffq eval`` does (same prompts, per-image seeds and pipeline settings, so the
``classifier_test`` FIDs equal its report's) and scores them with two distances on the same
digit-classifier features:

* FID against each ``--references`` split: ``classifier_test`` (216 digits) and ``diffusion``
  (the 1,078 digits the diffusion models were trained on; FID against the training set is how
  unconditional models are usually reported);
* KID (:func:`diffq.metrics.kernel_distance`), the unbiased kernel distance, against each split.

Every two presets are compared on the same ``--bootstrap`` resamples of the generated images
(KID on each resample's distinct images, since it is a U-statistic). Writes ``results.md`` /
``results.json`` to ``--out/<model>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from common import DEFAULT_RESULTS, markdown, publish

SPLITS = ("classifier_test", "diffusion")


def preset_images(model: str, preset: str, num_images: int, seed: int, progress: bool) -> torch.Tensor:
    """``[N, C, H, W]`` images of one preset, generated like ``diffq eval`` generates them."""
    import diffq
    from diffq.metrics.evaluate import FP, default_call_kwargs, preset_spec
    from diffq.metrics.generation import generate_images, shard_batches
    from diffq.metrics.prompts import resolve_prompts

    prompts, _ = resolve_prompts(model, num_images)
    pipe = diffq.load(model)
    if preset != FP:
        name, options = preset_spec(preset)
        diffq.quantize(pipe, name, progress=progress, **options)
    batches = shard_batches(num_images, 16)  # diffq eval's default batches: the same numerics
    images, _ = generate_images(pipe, prompts, batches, seed=seed, call_kwargs=default_call_kwargs(model),
                                progress=progress, desc=preset)
    return torch.stack([images[i] for i in range(num_images)])


def _kid_or_nan(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID of a resample; NaN when it drew fewer than 2 distinct images (tiny runs only)."""
    from diffq.metrics.fid import kernel_distance

    return kernel_distance(real, fake) if fake.shape[0] >= 2 else float("nan")


def distances(features: dict[str, torch.Tensor], real: torch.Tensor, fid: Any, indices: torch.Tensor
              ) -> dict[str, dict[str, Any]]:
    """Per preset: FID and KID on all images, and on each resample of ``indices``."""
    from diffq.metrics.fid import kernel_distance

    out = {}
    for name, feats in features.items():
        out[name] = {
            "fid": fid.distance(feats),
            "kid": kernel_distance(real, feats),
            "fid_resampled": fid.bootstrap(feats, indices),
            "kid_resampled": torch.tensor([_kid_or_nan(real, feats[row.unique()]) for row in indices],
                                          dtype=torch.float64),
        }
    return out


def paired(scores: dict[str, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Every two presets: difference on all images, 90 % interval and share of resamples a is lower."""
    from diffq.metrics.fid import paired_difference

    names, rows = list(scores), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = scores[a][f"{metric}_resampled"] - scores[b][f"{metric}_resampled"]
            summary = paired_difference(scores[a][metric] - scores[b][metric], diff[diff.isfinite()])
            rows.append({"a": a, "b": b, **summary})
    return rows


def measure(model: str, presets: list[str], num_images: int, references: list[str], replicates: int, seed: int,
            progress: bool) -> dict[str, Any]:
    from diffq.metrics.fid import FID, bootstrap_indices, select_feature_extractor
    from diffq.pipelines.reference.data import load_split

    began = time.perf_counter()
    images = {p: preset_images(model, p, num_images, seed, progress) for p in presets}
    _, feature = select_feature_extractor("digit-classifier")
    size = next(iter(images.values())).shape[-1]
    indices = bootstrap_indices(num_images, replicates, seed)
    result: dict[str, Any] = {"model": model, "num_images": num_images, "bootstrap": replicates, "references": {}}
    for split in references:
        real_images, _ = load_split(split, size=size)
        fid = FID(feature, real_images)
        real = fid.features(real_images)
        scores = distances({p: fid.features(x) for p, x in images.items()}, real, fid, indices)
        result["references"][split] = {
            "num_real": int(real.shape[0]),
            "scores": {p: {"fid": s["fid"], "fid_sd": float(s["fid_resampled"].std()), "kid": s["kid"],
                           "kid_sd": float(s["kid_resampled"][s["kid_resampled"].isfinite()].std())} for p, s in scores.items()},
            "fid_differences": paired(scores, "fid"),
            "kid_differences": paired(scores, "kid"),
        }
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"### {result['model']}: {result['num_images']} images per preset, {result['bootstrap']} paired resamples "
             f"({result['seconds']:.0f} s)", ""]
    for split, ref in result["references"].items():
        rows = [[p, f"{s['fid']:.4f} ± {s['fid_sd']:.3f}", f"{1e3 * s['kid']:.3f} ± {1e3 * s['kid_sd']:.3f}"]
                for p, s in ref["scores"].items()]
        lines += [f"Against `{split}` ({ref['num_real']} real digits):", "",
                  markdown(["preset", "FID (± sd)", "KID × 1000 (± sd)"], rows), ""]
        diffs = []
        for f, k in zip(ref["fid_differences"], ref["kid_differences"], strict=True):
            diffs.append([f"{f['a']} − {f['b']}", f"{f['difference']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}]",
                          f"{f['a_lower']:.0%}", f"{1e3 * k['difference']:+.3f} [{1e3 * k['low']:+.3f}, {1e3 * k['high']:+.3f}]",
                          f"{k['a_lower']:.0%}"])
        lines += [markdown(["a − b", "FID (90 % interval)", "a lower (FID)", "KID × 1000 (90 % interval)",
                            "a lower (KID)"], diffs), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--presets", default="fp,w4a8-rtn,w4a8")
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--references", default=",".join(SPLITS))
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_RESULTS / "fid_robustness"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    unknown = [r for r in references if r not in SPLITS]
    if unknown or not references:
        parser.error(f"--references takes splits among {', '.join(SPLITS)}; got {args.references!r}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result = measure(args.model, presets, args.num_images, references, args.bootstrap, args.seed,
                     not args.no_progress)
    publish(Path(args.out) / args.model, report(result), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
