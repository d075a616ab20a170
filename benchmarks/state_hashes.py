"""SHA-256 of each quantized state dict, per bundled model and preset: the check that a refactor keeps behaviour.

    python benchmarks/state_hashes.py --out before.json     # on the old commit
    python benchmarks/state_hashes.py --compare before.json # on the new one: exits 1 if any hash differs

Runs on one thread (torch's reductions then add in one order), with each preset's default
calibration; ``w4.0a8`` measures a sensitivity analysis without a cache so nothing is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import torch

PRESETS = ("w8a8", "w8a8-rtn", "w4a8", "w4a8-rtn", "w4a4", "w4a4-rtn", "w4a16", "w4a16-rtn", "w4.0a8")
MODELS = ("digits-sd", "digits-dit")


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every saved tensor, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def hashes(models: tuple[str, ...], presets: tuple[str, ...]) -> dict[str, str]:
    import diffq
    from diffq.pipelines import denoiser_of

    out = {}
    for model in models:
        for preset in presets:
            start = time.perf_counter()
            pipe = diffq.load(model)
            os.environ["DIFFQ_CACHE"] = tempfile.mkdtemp(prefix="diffq-hash-")  # no sensitivity from a cache
            diffq.quantize(pipe, preset, progress=False)
            out[f"{model} {preset}"] = state_hash(denoiser_of(pipe))
            print(f"{model:10s} {preset:10s} {out[f'{model} {preset}'][:16]}  {time.perf_counter() - start:6.1f} s",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the hashes here (JSON)")
    parser.add_argument("--compare", help="compare with hashes written earlier; exit 1 on any difference")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    found = hashes(tuple(args.models.split(",")), tuple(args.presets.split(",")))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(found, handle, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as handle:
            expected = json.load(handle)
        differ = sorted(k for k in found if expected.get(k) != found[k])
        print("all equal" if not differ else f"DIFFERENT: {', '.join(differ)}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
