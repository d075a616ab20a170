"""Text-image alignment of a digits pipeline: how often the classifier sees the prompted digit.

    python -m diffq.pipelines.reference.evaluate digits-sd [--n 64] [--seed 0] [--steps 20] [--guidance 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def load_pipeline(name_or_path: str | Path):
    """Load a bundled pipeline by name, or any diffusers folder, in fp32 on CPU."""
    from diffusers import DiffusionPipeline

    from . import BUNDLED_MODELS, bundled_path

    if isinstance(name_or_path, str) and name_or_path in BUNDLED_MODELS:
        folder = bundled_path(name_or_path)
        if folder is None:
            raise FileNotFoundError(f"bundled weights of {name_or_path!r} are missing; run the reference training")
    else:
        folder = Path(name_or_path)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, batch_size: int = 64, **call_kwargs: Any) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] for ``prompts``, from one seeded generator (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        res = pipe(prompts[i : i + batch_size], generator=g, output_type="pt", **call_kwargs)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def alignment(
    pipe_or_path,
    n: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    classifier_dir: str | Path | None = None,
    **call_kwargs: Any,
) -> dict:
    """Share of ``n`` generated images (prompts from ``eval_prompts(n)``) the classifier reads as the
    prompted digit; ``classifier_dir`` overrides the bundled classifier."""
    from .classifier import load_classifier
    from .data import eval_prompts

    pipe = pipe_or_path if hasattr(pipe_or_path, "components") else load_pipeline(pipe_or_path)
    pairs = eval_prompts(n)
    start = time.time()
    images = generate(pipe, [p for p, _ in pairs], seed=seed, batch_size=batch_size, **call_kwargs)
    seconds = time.time() - start
    predicted = load_classifier(classifier_dir).predict(images)
    target = torch.tensor([d for _, d in pairs])
    return {
        "accuracy": round(float((predicted == target).float().mean()), 4),
        "n": n,
        "seed": seed,
        "generate_seconds": round(seconds, 1),
        "finite": bool(torch.isfinite(images).all()),
    }


def main(argv: list[str] | None = None) -> None:
    from . import DEFAULT_CALL_KWARGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="digits-sd, digits-dit or a pipeline folder")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.model if args.model in DEFAULT_CALL_KWARGS else None
    if name is None:
        index = json.loads((Path(args.model) / "model_index.json").read_text())
        name = "digits-dit" if index["_class_name"].startswith("PixArt") else "digits-sd"
    kwargs = dict(DEFAULT_CALL_KWARGS[name])
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    result = alignment(args.model, n=args.n, seed=args.seed, **kwargs)
    print(json.dumps({"model": args.model, **kwargs, **result}))


if __name__ == "__main__":
    main()
