"""How long GPTQ weight rounding takes: an SD 1.5-size UNet (published config, random float32
weights) quantized as a bare module, round-to-nearest against GPTQ, on the CPU.

    python benchmarks/gptq_time.py [--presets w4a16,w4a8] [--threads 2]

Calibration is one forward pass on a 32×32 latent with 77 text tokens (batch 2); the seconds are
those of ``diffq.quantize`` (calibration, planning, conversion), measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import machine_line
from memory import MODELS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a16,w4a8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import diffq

    torch.manual_seed(0)
    example = {"sample": torch.randn(2, 4, 32, 32), "timestep": torch.tensor([500.0, 500.0]),
               "encoder_hidden_states": torch.randn(2, 77, 768)}
    print(machine_line(), f"Threads: {args.threads}.")
    print("| preset | rounding | seconds |\n|---|---|---:|")
    for preset in args.presets.split(","):
        for rounding in ("nearest", "gptq"):
            unet = build(MODELS["sd15"], device="cpu", dtype=torch.float32)
            start = time.perf_counter()
            diffq.quantize(unet, preset, calibration=[example], weight_rounding=rounding, progress=False)
            print(f"| {preset} | {rounding} | {time.perf_counter() - start:.1f} |", flush=True)
            del unet
    return 0


if __name__ == "__main__":
    sys.exit(main())
